"""Builds fastadapters and its optional compiled extension fastadapters._C.

- The CPU part (csrc/bindings.cpp, csrc/cpu/*.cpp) is built, with OpenMP, whenever torch is importable
  at build time (`pip install . --no-build-isolation`). Without torch (build isolation: pyproject.toml
  does not ask for it) the wheel is pure Python plus Triton, and fastadapters/_ext.py compiles the CPU
  part just-in-time on first use.
- The CUDA part (csrc/cuda/*.cu) is added only where torch is a CUDA build, CUDA_HOME/bin/nvcc exists and
  nvcc's CUDA major version equals torch.version.cuda's (`cuda_plan`); otherwise the extension is CPU-only
  and the log says why. With no GPU visible and TORCH_CUDA_ARCH_LIST unset, the CUDA part is built for
  DEFAULT_ARCH_LIST (torch would otherwise fail asking the absent GPU for its architecture).
- FASTADAPTERS_SKIP_EXT=1 skips the extension; MAX_JOBS is honoured by torch's ninja build.
- Any failure of the CUDA build (the toolkit check, the arch flags, a compiler error) falls back to the
  CPU-only extension, and a failed CPU build does not fail the install: the package warns once at import
  and runs on its other backends. Every build writes build/fastadapters_ext.log: what was built and why,
  and the traceback of each attempt that failed.
"""

import glob
import os
import re
import subprocess
import sys
import traceback

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
LOG = os.path.join(ROOT, "build", "fastadapters_ext.log")
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"  # A100 and H100/H200, plus PTX for later GPUs


def nvcc_release(text: str) -> str | None:
    """The CUDA version ("13.0") in `nvcc --version`'s output, or None when it names none."""
    match = re.search(r"release (\d+)\.(\d+)", text)
    return f"{match[1]}.{match[2]}" if match else None


def query_nvcc(cuda_home: str | None) -> str | None:
    """The CUDA version of CUDA_HOME/bin/nvcc, or None when it is missing or does not answer."""
    if not cuda_home:
        return None
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.access(nvcc, os.X_OK):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return nvcc_release(out.stdout + out.stderr)


def cuda_plan(torch_cuda: str | None, cuda_home: str | None, nvcc: str | None, has_sources: bool):
    """(build the CUDA part?, why): torch_cuda is torch.version.cuda, nvcc the version query_nvcc found."""
    if not has_sources:
        return False, "no csrc/cuda/*.cu sources"
    if not torch_cuda:
        return False, "torch is a CPU build (torch.version.cuda is None)"
    if not cuda_home:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if nvcc is None:
        return False, f"no working nvcc at CUDA_HOME/bin/nvcc (CUDA_HOME={cuda_home})"
    if nvcc.split(".")[0] != torch_cuda.split(".")[0]:
        return False, f"nvcc is CUDA {nvcc} but torch was built with CUDA {torch_cuda}: the majors differ"
    return True, f"nvcc CUDA {nvcc} at {cuda_home}, torch CUDA {torch_cuda}"


def default_arch_list(environ, gpu_visible: bool) -> str | None:
    """The TORCH_CUDA_ARCH_LIST to set: DEFAULT_ARCH_LIST when no GPU is visible and none is set."""
    if gpu_visible or environ.get("TORCH_CUDA_ARCH_LIST"):
        return None
    return DEFAULT_ARCH_LIST


def _write_log(lines: list[str]) -> None:
    os.makedirs(os.path.dirname(LOG), exist_ok=True)
    with open(LOG, "w") as f:
        f.write("\n".join(lines) + "\n")


# The fields in which the CUDA extension differs from the CPU-only one (the fallback copies them back).
_EXT_FIELDS = ("sources", "include_dirs", "library_dirs", "libraries", "define_macros", "extra_compile_args",
               "extra_link_args", "runtime_library_dirs", "language")  # fmt: skip


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

    def cpu_extension():
        return cpp_extension.CppExtension(
            "fastadapters._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
        )

    notes = []  # what the log says about the choice, before the build's outcome
    ext = None
    try:
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        home = cpp_extension.CUDA_HOME
        use_cuda, why = cuda_plan(torch.version.cuda, home, query_nvcc(home), bool(cuda_sources))
        notes.append(f"CUDA part: {'yes' if use_cuda else 'no'} ({why})")
        if use_cuda:
            arch = default_arch_list(os.environ, torch.cuda.is_available())
            if arch:
                os.environ["TORCH_CUDA_ARCH_LIST"] = arch
                notes.append("no GPU visible and TORCH_CUDA_ARCH_LIST unset: the default list")
            notes.append(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '(the GPU)')}")
            ext = cpp_extension.CUDAExtension(
                "fastadapters._C",
                sources + cuda_sources,
                define_macros=[("FASTADAPTERS_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
                extra_link_args=["-fopenmp"],
            )
    except Exception:  # noqa: BLE001 - whatever went wrong with CUDA, the CPU part still builds
        notes += ["CUDA setup failed; building the CPU part alone:", traceback.format_exc()]
    with_cuda = ext is not None
    ext = ext or cpu_extension()

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds the extension chosen above; if that is the CUDA one and anything fails (torch's toolkit
        check, the arch flags, a compiler error), the CPU-only one; never fails the install."""

        def build_extensions(self):
            compiler = self.compiler
            # BuildExtension.build_extensions wraps these compiler methods: a second attempt starts over.
            saved = {k: compiler.__dict__.get(k) for k in ("_compile", "compile")}
            src_extensions = list(compiler.src_extensions)
            log = list(notes)
            if with_cuda:
                if self._attempt(log, "CPU + CUDA"):
                    return
                print(f"WARNING: fastadapters._C: the CUDA part failed to build; see {LOG}", file=sys.stderr)
                for key, value in saved.items():
                    if value is None:
                        compiler.__dict__.pop(key, None)
                    else:
                        setattr(compiler, key, value)
                compiler.src_extensions = src_extensions
                cpu = cpu_extension()
                for field in _EXT_FIELDS:
                    setattr(ext, field, getattr(cpu, field))
                log.append("retrying with the CPU part alone")
            if not self._attempt(log, "CPU only"):
                print(f"WARNING: fastadapters._C failed to build; see {LOG}", file=sys.stderr)

        def _attempt(self, log: list[str], what: str) -> bool:
            """Builds the extension as it stands; appends the outcome to `log` and writes it."""
            try:
                super().build_extensions()
                log.append(f"fastadapters._C built: {what}")
                return True
            except Exception:  # noqa: BLE001 - any compiler failure: the caller falls back
                log += [f"build failed ({what}):", traceback.format_exc()]
                return False
            finally:
                _write_log(log)

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


CSRC_FILES = ["*.h", "*.cpp", "cpu/*.h", "cpu/*.cpp", "cuda/*.h", "cuda/*.cuh", "cuda/*.cu"]

if __name__ == "__main__":
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
        # The C++/CUDA sources ship as fastadapters/csrc: a wheel built without torch (build isolation) has
        # no _C, and fastadapters/_ext.py compiles its CPU part from them just-in-time.
        package_data={"fastadapters.csrc": CSRC_FILES},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
