"""setup.py's choice of what to build: nvcc's version, the CUDA decision table and the default arch list.

The CUDA branch needs a CUDA torch, which `make test` does not have: scripts/gpu_dryrun.sh builds with one
(a fake nvcc of another CUDA major, no nvcc, the real toolkit). Here the pure decision functions are tested.
"""

import importlib.util
import pathlib
import stat

import pytest
from torch.utils.cpp_extension import BuildExtension

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_setup():
    spec = importlib.util.spec_from_file_location("fastadapters_setup_py", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # setup() itself runs only under __main__
    return module


S = _load_setup()

NVCC_13 = """nvcc: NVIDIA (R) Cuda compiler driver
Copyright (c) 2005-2025 NVIDIA Corporation
Built on Wed_Aug_20_01:58:59_PM_PDT_2025
Cuda compilation tools, release 13.0, V13.0.88
Build cuda_13.0.r13.0/compiler.36424714_0
"""


@pytest.mark.parametrize(
    "text, expected",
    [(NVCC_13, "13.0"), ("Cuda compilation tools, release 12.4, V12.4.131", "12.4"),
     ("bash: nvcc: not found", None), ("", None)],
)  # fmt: skip
def test_nvcc_release(text, expected):
    assert S.nvcc_release(text) == expected


def _fake_nvcc(tmp_path, text, executable=True):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nvcc = bin_dir / "nvcc"
    nvcc.write_text(f"#!/bin/sh\ncat <<'EOF'\n{text}\nEOF\n")
    if executable:
        nvcc.chmod(nvcc.stat().st_mode | stat.S_IXUSR)
    return str(tmp_path)


def test_query_nvcc_runs_cuda_home_nvcc(tmp_path):
    assert S.query_nvcc(_fake_nvcc(tmp_path, "Cuda compilation tools, release 12.8, V12.8.93")) == "12.8"


@pytest.mark.parametrize("case", ["no home", "no nvcc", "not executable", "no version"])
def test_query_nvcc_without_a_working_nvcc(tmp_path, case):
    home = {
        "no home": lambda: None,
        "no nvcc": lambda: str(tmp_path),
        "not executable": lambda: _fake_nvcc(tmp_path, NVCC_13, executable=False),
        "no version": lambda: _fake_nvcc(tmp_path, "something else"),
    }[case]()
    assert S.query_nvcc(home) is None


@pytest.mark.parametrize(
    "torch_cuda, home, nvcc, sources, build, reason",
    [
        ("13.0", "/cuda", "13.0", True, True, "nvcc CUDA 13.0"),
        ("13.0", "/cuda", "13.2", True, True, "torch CUDA 13.0"),  # same major: compatible
        ("12.8", "/cuda", "13.0", True, False, "majors differ"),
        ("13.0", "/cuda", "12.4", True, False, "majors differ"),
        ("13.0", "/cuda", None, True, False, "no working nvcc"),
        ("13.0", None, None, True, False, "no CUDA toolkit"),
        (None, "/cuda", "13.0", True, False, "CPU build"),
        ("13.0", "/cuda", "13.0", False, False, "no csrc/cuda"),
    ],
)
def test_cuda_plan(torch_cuda, home, nvcc, sources, build, reason):
    use_cuda, why = S.cuda_plan(torch_cuda, home, nvcc, sources)
    assert use_cuda is build and reason in why


@pytest.mark.parametrize(
    "env, gpu, expected",
    [({}, False, "8.0;9.0+PTX"), ({"TORCH_CUDA_ARCH_LIST": "9.0"}, False, None), ({}, True, None),
     ({"TORCH_CUDA_ARCH_LIST": ""}, False, "8.0;9.0+PTX")],
)  # fmt: skip
def test_default_arch_list(env, gpu, expected):
    assert S.default_arch_list(env, gpu) == expected


def test_extensions_on_the_cpu_torch(monkeypatch):
    """With the CPU torch: one CPU-only extension (no .cu source), built by the never-failing build_ext."""
    monkeypatch.delenv("FASTADAPTERS_SKIP_EXT", raising=False)
    monkeypatch.chdir(ROOT)
    [ext], cmdclass = S._extensions()
    assert ext.name == "fastadapters._C"
    assert ext.sources and not any(src.endswith(".cu") for src in ext.sources)
    build_ext = cmdclass["build_ext"]
    assert (
        issubclass(build_ext, BuildExtension)
        and build_ext.build_extensions is not BuildExtension.build_extensions
    )
    monkeypatch.setenv("FASTADAPTERS_SKIP_EXT", "1")
    assert S._extensions() == ([], {})
