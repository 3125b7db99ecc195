"""Loads the optional compiled extension fastadapters._C once, or compiles its CPU part just-in-time.

- An installed `_C` (built by `pip install . --no-build-isolation` where torch was importable) is
  imported at once.
- Without one (a wheel built with build isolation is pure Python), the first call of an op whose
  preferred backend is the C++ one (`jit`, asked by dispatch) compiles csrc/bindings.cpp and
  csrc/cpu/*.cpp with `torch.utils.cpp_extension.load` into a per-user cache (`cache_dir`), printing one
  line; later processes load it from there. A file lock keeps concurrent processes from building at
  once. If the build fails, one warning gives the reason and the ops run on their Triton and torch
  backends. CUDA kernels are built at install time only. `fastadapters build-ext` compiles ahead of time.
- FASTADAPTERS_JIT=0 turns the just-in-time build off; FASTADAPTERS_SKIP_EXT=1 does that too and silences
  the warning about a missing extension; FASTADAPTERS_DISABLE_EXT=1 loads nothing at all (to test the
  pure-Python path, or to rule the extension out when debugging).
"""

import contextlib
import hashlib
import importlib.util
import os
import sys
import threading
import warnings

_PKG = os.path.dirname(os.path.abspath(__file__))
_LOG = os.path.join(os.path.dirname(_PKG), "build", "fastadapters_ext.log")

# What setup.py compiles for the CPU part of _C; keep the two in step.
CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-psabi"]
LD_FLAGS = ["-fopenmp"]
CACHE_ENV = "FASTADAPTERS_CACHE"
JIT_ENV = "FASTADAPTERS_JIT"

AVAILABLE = False
ERROR: str | None = None
# Where the loaded _C came from: its file (installed, or the just-in-time cache); None when not loaded.
PATH: str | None = None
_C = None
_jit_tried = False
_jit_lock = threading.Lock()


def source_dir() -> str | None:
    """The C++ sources: fastadapters/csrc in an installed wheel, <checkout>/csrc in a source tree."""
    for path in (os.path.join(_PKG, "csrc"), os.path.join(os.path.dirname(_PKG), "csrc")):
        if os.path.isfile(os.path.join(path, "bindings.cpp")):
            return path
    return None


def cache_dir() -> str:
    """The per-user cache of just-in-time builds: $FASTADAPTERS_CACHE, else $XDG_CACHE_HOME/fastadapters,
    else ~/.cache/fastadapters."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastadapters")


def jit_disabled() -> str | None:
    """Why the just-in-time build is off (an environment switch, or no sources), or None when it is on."""
    if os.environ.get("FASTADAPTERS_DISABLE_EXT") == "1":
        return "FASTADAPTERS_DISABLE_EXT=1"
    if os.environ.get("FASTADAPTERS_SKIP_EXT") == "1":
        return "FASTADAPTERS_SKIP_EXT=1"
    if os.environ.get(JIT_ENV, "1") == "0":
        return f"{JIT_ENV}=0"
    if source_dir() is None:
        return f"no C++ sources in {os.path.join(_PKG, 'csrc')}"
    return None


def _cpu_sources(root: str) -> list[str]:
    cpu = os.path.join(root, "cpu")
    return [os.path.join(root, "bindings.cpp")] + sorted(
        os.path.join(cpu, f) for f in os.listdir(cpu) if f.endswith(".cpp")
    )


def build_dir() -> str:
    """The cache folder of this build: one per Python, torch and source contents, so a torch upgrade or
    changed sources never load a stale library."""
    import torch

    root = source_dir()
    if root is None:
        raise RuntimeError(f"no C++ sources to build from in {os.path.join(_PKG, 'csrc')}")
    digest = hashlib.sha256(" ".join(CXX_FLAGS + LD_FLAGS).encode())
    for folder in (root, os.path.join(root, "cpu")):
        for name in sorted(os.listdir(folder)):
            if name.endswith((".cpp", ".h")):
                digest.update(name.encode())
                with open(os.path.join(folder, name), "rb") as f:
                    digest.update(f.read())
    tag = (
        f"cpu-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}-{digest.hexdigest()[:12]}"
    )
    return os.path.join(cache_dir(), tag)


def _library(folder: str) -> str:
    return os.path.join(folder, "_C.so")


@contextlib.contextmanager
def _file_lock(folder: str):
    """Holds an exclusive lock on <folder>.lock: the OS drops it when the process dies, so a killed build
    never leaves the next one waiting on a stale lock."""
    import fcntl

    os.makedirs(folder, exist_ok=True)
    with open(folder + ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _import(path: str):
    spec = importlib.util.spec_from_file_location("fastadapters._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # loading it registers torch.ops.fastadapters_C
    return module


def _use(module, path: str) -> None:
    global AVAILABLE, ERROR, PATH, _C
    sys.modules["fastadapters._C"] = module
    if "fastadapters" in sys.modules:
        sys.modules["fastadapters"]._C = module
    _C, PATH, AVAILABLE, ERROR = module, path, True, None


def compile_cpu(verbose: bool = False, announce: bool = False, retry: bool = True) -> str:
    """Compiles the extension's CPU kernels into `build_dir()` (or finds them built there), loads them as
    fastadapters._C and returns the library's path; raises RuntimeError (the compiler's output written to
    <build_dir>/build.log) when the build fails. `announce` prints one line on stderr before compiling;
    retry=False raises at once if an earlier build of the same sources failed (its build.log is there)."""
    folder = build_dir()
    with _file_lock(folder):
        library, module, log = _library(folder), None, os.path.join(folder, "build.log")
        if os.path.isfile(library):
            try:
                module = _import(library)
            except ImportError:  # a truncated library from a killed build: build it again
                os.remove(library)
        if module is None and not retry and os.path.isfile(log):
            with open(log) as f:
                first = f.readline().strip()
            raise RuntimeError(f"{first}; an earlier build failed, `fastadapters build-ext` tries again")
        if module is None:
            if announce:
                print(
                    f"fastadapters: compiling the C++ extension (CPU kernels) just-in-time into {folder}; "
                    "once, under a minute (FASTADAPTERS_JIT=0 turns this off)",
                    file=sys.stderr,
                    flush=True,
                )
            from torch.utils import cpp_extension

            with contextlib.suppress(FileNotFoundError):  # torch's own lock, left by a killed build
                os.remove(os.path.join(folder, "lock"))
            try:
                module = cpp_extension.load(
                    "_C",
                    _cpu_sources(source_dir()),
                    extra_cflags=CXX_FLAGS,
                    extra_ldflags=LD_FLAGS,
                    build_directory=folder,
                    with_cuda=False,
                    verbose=verbose,
                )
            except Exception as exc:  # noqa: BLE001 - compiler, linker and loader failures all end here
                # One line for the warning: the compiler's first error, else the exception's first line.
                lines = str(exc).strip().splitlines() or [type(exc).__name__]
                first = next((line for line in lines if "error:" in line), lines[0]).strip()[:300]
                first = f"{first} (build log: {log})"
                with open(log, "w") as f:
                    f.write(f"{first}\n\n{type(exc).__name__}: {exc}\n")
                raise RuntimeError(first) from exc
            with contextlib.suppress(FileNotFoundError):
                os.remove(log)
    _use(module, library)
    return library


def jit(build: bool = True) -> bool:
    """Whether fastadapters._C is loaded, trying the just-in-time build the first time it is asked (the
    dispatch hook of the C++ backends; later calls only read a flag). A build that failed is not tried
    again (`fastadapters build-ext` does). With build=False it only loads an earlier build from the cache,
    and this process then never compiles (`fastadapters backends`)."""
    global _jit_tried, ERROR
    if AVAILABLE or _jit_tried or "fastadapters._C" in sys.modules:
        return AVAILABLE  # (an installed _C is loaded: a second library would register its ops twice)
    with _jit_lock:
        if AVAILABLE or _jit_tried:
            return AVAILABLE
        try:
            off = jit_disabled()
            if off is not None:
                if off not in str(ERROR):
                    ERROR = f"{ERROR}; just-in-time build off: {off}"
                return False
            if not build:
                folder = build_dir()
                if os.path.isfile(_library(folder)) or os.path.isfile(os.path.join(folder, "build.log")):
                    compile_cpu(retry=False)  # loads the library, or raises the earlier build's error
                else:
                    ERROR = (
                        "not compiled yet; the first CPU call compiles it just-in-time into "
                        f"{cache_dir()}, or run `fastadapters build-ext`"
                    )
                return AVAILABLE
            compile_cpu(announce=True, retry=False)
        except Exception as exc:  # noqa: BLE001 - a failed build leaves the Triton and torch backends
            ERROR = f"the just-in-time build failed: {exc}"
            warnings.warn(
                f"fastadapters._C could not be compiled just-in-time; ops use their Triton and torch "
                f"backends. {ERROR}",
                RuntimeWarning,
                stacklevel=2,
            )
        finally:
            _jit_tried = True
    return AVAILABLE


if os.environ.get("FASTADAPTERS_DISABLE_EXT") == "1":
    ERROR = "disabled by FASTADAPTERS_DISABLE_EXT=1"
else:
    try:
        import torch  # noqa: F401  (first: _C links against libc10/libtorch, which torch loads)

        from fastadapters import _C  # loading it registers torch.ops.fastadapters_C

        AVAILABLE, PATH = True, _C.__file__
    except ImportError as exc:  # pragma: no cover - depends on the build
        ERROR = str(exc)

# Without _C the just-in-time build says its own line on first use; warn now only if it will not run.
if not AVAILABLE and os.environ.get("FASTADAPTERS_SKIP_EXT") != "1" and jit_disabled() is not None:
    warnings.warn(
        "fastadapters._C (the compiled CPU/CUDA kernels) is not available; ops use their Triton and "
        f"torch backends. Rebuild with `pip install -e . --no-build-isolation` (build log: {_LOG}) or "
        f"`fastadapters build-ext`, or set FASTADAPTERS_SKIP_EXT=1 to silence this. Reason: {ERROR}",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return AVAILABLE and bool(getattr(_C, "WITH_CUDA", 0))


def has_op(name: str) -> bool:
    """Whether the extension provides the op `name` (torch.ops.fastadapters_C.<name>, e.g.
    "bottleneck_forward"); False when fastadapters._C is not loaded."""
    import torch

    return AVAILABLE and hasattr(torch.ops.fastadapters_C, name)
