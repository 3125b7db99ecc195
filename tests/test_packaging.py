"""Packaging: the license and one version; the sdist and a wheel built without torch, installed into a
fresh virtual environment with `pip install --no-index --no-deps` (nothing downloaded), running a LoRA
forward and backward; the just-in-time build of the C++ extension into the per-user cache; the
`fastadapters --version`, `build-ext` and `backends` commands.

The slow tests share one sdist, wheel and virtual environment (a module fixture). Every subprocess gets
its own fresh FASTADAPTERS_CACHE, so no test touches (or waits on a lock in) the user's cache.
"""

import json
import os
import re
import site as sitelib
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import fastadapters
from fastadapters import _ext, cli
from fastadapters.ops import _dispatch

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# One LoRA layer's forward and backward through fastadapters, against the same maths in plain torch.
LORA_SCRIPT = """
import json, sys, warnings
import torch
import fastadapters as fa
from fastadapters import _ext, ops

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 6))
fa.apply(model, fa.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["0"]))
layer = model[0]
torch.nn.init.normal_(layer.lora_B.weight)  # B starts at zero; make the adapter count
x = torch.randn(3, 5, 8)
y = model(x)
y.square().sum().backward()

a = layer.lora_A.weight.detach().clone().requires_grad_()
b = layer.lora_B.weight.detach().clone().requires_grad_()
ref = torch.nn.functional.linear(x, layer.base_layer.weight, layer.base_layer.bias) + 2.0 * (x @ a.T) @ b.T
ref.square().sum().backward()
print(json.dumps({
    "file": fa.__file__,
    "backend": ops.backend_for("lora_linear"),
    "ext_path": _ext.PATH,
    "ext_error": _ext.ERROR,
    "out_err": (y - ref).abs().max().item(),
    "grad_err": max((layer.lora_A.weight.grad - a.grad).abs().max().item(),
                    (layer.lora_B.weight.grad - b.grad).abs().max().item()),
}))
"""


# ------------------------------------------------------------------------------------------ fast checks


def test_license_is_apache_and_declared():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("Copyright 2026 The fastadapters authors\n")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a stub
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]


def test_build_requirements_fetch_no_torch():
    requires = PYPROJECT["build-system"]["requires"]
    assert requires == ["setuptools>=77"], requires  # no torch, pybind11 or wheel to fetch
    assert "ninja" in PYPROJECT["project"]["dependencies"]  # the just-in-time build needs it at run time
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert {"serve", "triton", "test", "qlora"} <= set(extras)


def test_one_version_read_by_the_cli(capsys):
    assert "version" not in PYPROJECT["project"] and "version" in PYPROJECT["project"]["dynamic"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastadapters.__version__"}
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastadapters {fastadapters.__version__}"


def test_cache_dir_and_jit_switches(monkeypatch, tmp_path):
    for name in ("FASTADAPTERS_CACHE", "XDG_CACHE_HOME", "FASTADAPTERS_JIT", "FASTADAPTERS_SKIP_EXT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("FASTADAPTERS_DISABLE_EXT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _ext.cache_dir() == str(tmp_path / "home" / ".cache" / "fastadapters")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _ext.cache_dir() == str(tmp_path / "xdg" / "fastadapters")
    monkeypatch.setenv("FASTADAPTERS_CACHE", str(tmp_path / "mine"))
    assert _ext.cache_dir() == str(tmp_path / "mine")
    assert _ext.build_dir().startswith(str(tmp_path / "mine") + os.sep)

    assert _ext.jit_disabled() is None  # the checkout's csrc/ is found
    for name, value in (
        ("FASTADAPTERS_JIT", "0"),
        ("FASTADAPTERS_SKIP_EXT", "1"),
        ("FASTADAPTERS_DISABLE_EXT", "1"),
    ):
        monkeypatch.setenv(name, value)
        assert _ext.jit_disabled() == f"{name}={value}"
        monkeypatch.delenv(name)


def test_a_failed_build_is_not_retried_on_first_use(monkeypatch, tmp_path):
    """The just-in-time hook gives an earlier failure's reason without compiling; build-ext retries."""
    monkeypatch.setenv("FASTADAPTERS_CACHE", str(tmp_path))
    folder = Path(_ext.build_dir())
    folder.mkdir(parents=True)
    (folder / "build.log").write_text("lora.cpp:3:1: error: boom (build log: here)\n\nthe compiler output\n")
    with pytest.raises(RuntimeError, match=r"error: boom \(build log: here\); an earlier build failed, "):
        _ext.compile_cpu(retry=False)
    assert sorted(p.name for p in folder.iterdir()) == ["build.log"]  # nothing was compiled


def test_backends_lists_every_op_and_device(capsys):
    assert cli.main(["backends"]) == 0
    out = capsys.readouterr().out
    for op in _dispatch.IMPLEMENTATIONS:
        for device in ("cpu", "cuda"):
            assert f"{op}, {device} tensors" in out, out
    lines = out.splitlines()
    first = lines[lines.index("lora_linear, cpu tensors:") + 1].split()
    assert first[1:] == ["available", "(chosen)"], out  # the C++ backend when _C is loaded, else torch
    assert first[0] == ("cpu" if _ext.AVAILABLE else "torch"), out
    assert out.count("(chosen)") == 2 * len(_dispatch.IMPLEMENTATIONS)


@pytest.mark.skipif(not _ext.AVAILABLE, reason="fastadapters._C is not built here")
def test_build_ext_with_an_installed_extension_builds_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FASTADAPTERS_CACHE", str(tmp_path))
    assert cli.main(["build-ext"]) == 0
    assert (
        capsys.readouterr().out.strip()
        == f"fastadapters._C is already loaded from {_ext.PATH}; nothing to build"
    )
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------- the sdist and wheel


def _run(cmd, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{cmd} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res


def _missing_build_tools() -> str | None:
    import importlib.metadata
    import importlib.util

    for name in ("pip", "setuptools"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed"
    pip = importlib.metadata.version("pip")
    if tuple(int(x) for x in re.findall(r"\d+", pip)[:2]) < (22, 3):
        return f"pip {pip} < 22.3 has no --python option"
    setuptools = importlib.metadata.version("setuptools")
    if int(setuptools.split(".")[0]) < 77:
        return f"setuptools {setuptools} < 77 cannot read pyproject.toml's SPDX license"
    return None


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Builds the sdist (the PEP 517 hook, as `python -m build` does), then the wheel from that sdist with
    torch hidden at build time (what build isolation gives: a pure wheel), and installs the wheel into a
    fresh venv whose .pth file points at this venv's site-packages for torch and the rest."""
    missing = _missing_build_tools()
    if missing:
        pytest.skip(missing)
    tmp = tmp_path_factory.mktemp("packaging")
    dist = tmp / "dist"
    _run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(dist)!r})"],
        ROOT,
    )
    (sdist,) = dist.glob("fastadapters-*.tar.gz")

    hide = tmp / "no_torch" / "torch"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('torch is hidden from this build')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPTERS_")}
    env["PYTHONPATH"] = str(hide.parent)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir"]
    _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(sdist)],
        tmp,
        env,
    )
    (wheel,) = dist.glob("fastadapters-*.whl")

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp)
    python = venv / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp)
    site = Path(purelib.stdout.strip())
    # This venv's site-packages, and the system's where it sees them (a GPU machine's torch lives there).
    (site / "project_venv.pth").write_text("".join(f"{p}\n" for p in sitelib.getsitepackages()))
    _run([*pip, "--python", str(python), "install", "--no-index", "--no-deps", str(wheel)], tmp)

    run_dir = tmp / "cwd"  # not the checkout, and nothing importable in it
    run_dir.mkdir()
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith("FASTADAPTERS_") and k != "PYTHONPATH"
    }
    return {
        "tmp": tmp,
        "sdist": sdist,
        "wheel": wheel,
        "venv": venv,
        "site": site,
        "cwd": run_dir,
        "env": base_env,
    }


def _venv_env(installed, cache: Path, **extra) -> dict:
    return {**installed["env"], "FASTADAPTERS_CACHE": str(cache), **extra}


@pytest.mark.slow
def test_sdist_and_wheel_hold_the_sources_and_the_license(installed):
    with tarfile.open(installed["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        pkg_info = tar.extractfile(f"fastadapters-{fastadapters.__version__}/PKG-INFO").read().decode()
    assert {"LICENSE", "pyproject.toml", "setup.py", "csrc/bindings.cpp", "csrc/cpu/lora.cpp"} <= names
    assert {"kernels/lora.py", "tests/conftest.py", "csrc/cuda/multi_lora.cu"} <= names
    assert f"Version: {fastadapters.__version__}" in pkg_info and "License-Expression: Apache-2.0" in pkg_info

    assert installed["wheel"].name.endswith("-py3-none-any.whl")  # no torch at build time: pure Python
    with zipfile.ZipFile(installed["wheel"]) as whl:
        names = set(whl.namelist())
    assert {
        "fastadapters/csrc/bindings.cpp",
        "fastadapters/csrc/cpu/ops.h",
        "fastadapters/kernels/lora.py",
    } <= names
    assert f"fastadapters-{fastadapters.__version__}.dist-info/licenses/LICENSE" in names
    assert not any(n.endswith(".so") for n in names)


@pytest.mark.slow
def test_installed_wheel_runs_a_lora_step_and_prints_its_version(installed):
    cache = installed["tmp"] / "cache_off"
    env = _venv_env(installed, cache, FASTADAPTERS_JIT="0")
    res = _run([str(installed["venv"] / "bin" / "python"), "-c", LORA_SCRIPT], installed["cwd"], env)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert Path(out["file"]).is_relative_to(installed["site"]), out  # the wheel's copy, not the checkout
    assert out["backend"] == "torch" and out["ext_path"] is None, out
    assert "FASTADAPTERS_JIT=0" in out["ext_error"], out
    assert out["out_err"] < 1e-5 and out["grad_err"] < 1e-4, out
    assert "fastadapters._C (the compiled CPU/CUDA kernels) is not available" in res.stderr, res.stderr
    assert not cache.exists()

    res = _run([str(installed["venv"] / "bin" / "fastadapters"), "--version"], installed["cwd"], env)
    assert res.stdout.strip() == f"fastadapters {fastadapters.__version__}"


@pytest.mark.slow
def test_first_cpu_call_compiles_the_extension_into_the_user_cache(installed):
    """The installed wheel has no _C. Started together on one fresh cache: a LoRA step (its first CPU call
    compiles _C just-in-time) and `fastadapters build-ext`; the file lock lets one compile and the other
    load the result. Beside them: `fastadapters backends` on an empty cache compiles nothing, and a cache
    that cannot be created leaves the torch backend with a warning."""
    python, bindir, cwd = (
        str(installed["venv"] / "bin" / "python"),
        installed["venv"] / "bin",
        installed["cwd"],
    )
    cache, empty = installed["tmp"] / "cache", installed["tmp"] / "cache_empty"
    broken = installed["tmp"] / "cache_is_a_file"
    broken.write_text("")
    jobs = {
        "step": ([python, "-c", LORA_SCRIPT], _venv_env(installed, cache)),
        "build-ext": ([str(bindir / "fastadapters"), "build-ext"], _venv_env(installed, cache)),
        "backends": ([str(bindir / "fastadapters"), "backends"], _venv_env(installed, empty)),
        "broken": ([python, "-c", LORA_SCRIPT], _venv_env(installed, broken)),
    }
    procs = {
        name: subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (cmd, env) in jobs.items()
    }
    res = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{out}\n{err}"
        res[name] = (out, err)

    libraries = list(cache.glob("cpu-*/_C.so"))
    assert len(libraries) == 1, list(cache.rglob("*"))
    step = json.loads(res["step"][0].strip().splitlines()[-1])
    assert step["backend"] == "cpu" and step["ext_path"] == str(libraries[0]), step
    assert step["out_err"] < 1e-5 and step["grad_err"] < 1e-4, step
    assert res["build-ext"][0].strip() == f"fastadapters._C (CPU kernels) is compiled in {libraries[0]}"
    announced = [name for name in ("step", "build-ext") if "compiling the C++ extension" in res[name][1]]
    assert len(announced) == 1, res  # one process compiled, the other waited and loaded its library
    assert "not available" not in res["step"][1]  # with the just-in-time build ahead, no import warning

    backends = res["backends"][0]
    assert (
        "lora_linear, cpu tensors:\n  cpu     unavailable: fastadapters._C is not built (not compiled yet"
        in backends
    )
    assert not empty.exists()

    broken_step = json.loads(res["broken"][0].strip().splitlines()[-1])
    assert broken_step["backend"] == "torch" and broken_step["out_err"] < 1e-5, broken_step
    assert "the just-in-time build failed" in broken_step["ext_error"], broken_step
    assert "could not be compiled just-in-time" in res["broken"][1], res["broken"][1]
