"""Builds fastadapters and its optional compiled extension fastadapters._C.

- The CPU part (csrc/bindings.cpp, csrc/cpu/*.cpp) is built, with OpenMP, whenever torch is importable
  at build time (`pip install . --no-build-isolation`). Without torch (build isolation: pyproject.toml
  does not ask for it) the wheel is pure Python plus Triton, and fastadapters/_ext.py compiles the CPU
  part just-in-time on first use.
- The CUDA part (csrc/cuda/*.cu) is added only where a CUDA toolkit and a CUDA build of torch exist.
- FASTADAPTERS_SKIP_EXT=1 skips the extension; MAX_JOBS is honoured by torch's ninja build.
- A failed build does not fail the install: the log goes to build/fastadapters_ext.log and the
  package warns once at import and runs on its other backends.
"""

import glob
import os
import sys
import traceback

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
LOG = os.path.join(ROOT, "build", "fastadapters_ext.log")


def _extensions():
    if os.environ.get("FASTADAPTERS_SKIP_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    sources = ["csrc/bindings.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    # No -std here: torch's build adds the standard its headers need.
    cxx = ["-O3", "-fopenmp", "-Wno-psabi"]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    use_cuda = bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None and cuda_sources
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastadapters._C",
            sources + cuda_sources,
            define_macros=[("FASTADAPTERS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = cpp_extension.CppExtension(
            "fastadapters._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds the extension but never fails the install; the log tells why it did not build."""

        def build_extension(self, extension):
            os.makedirs(os.path.dirname(LOG), exist_ok=True)
            try:
                super().build_extension(extension)
                with open(LOG, "w") as f:
                    f.write("fastadapters._C built\n")
            except Exception:  # noqa: BLE001 - any compiler failure leaves the pure-Python package
                with open(LOG, "w") as f:
                    f.write(traceback.format_exc())
                print(f"WARNING: fastadapters._C failed to build; see {LOG}", file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "fastadapters",
        "fastadapters.ops",
        "fastadapters.kernels",
        "fastadapters.serving",
        "fastadapters.csrc",
    ],
    package_dir={
        "fastadapters": "fastadapters",
        "fastadapters.kernels": "kernels",
        "fastadapters.csrc": "csrc",
    },
    # The C++/CUDA sources ship as fastadapters/csrc: a wheel built without torch (build isolation) has no
    # _C, and fastadapters/_ext.py compiles its CPU part from them just-in-time.
    package_data={
        "fastadapters.csrc": ["*.h", "*.cpp", "cpu/*.h", "cpu/*.cpp", "cuda/*.h", "cuda/*.cuh", "cuda/*.cu"]
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
