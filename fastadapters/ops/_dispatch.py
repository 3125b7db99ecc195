"""Backend dispatch: backends say whether they CAN run a call; a priority list per op says which is PREFERRED.

Each op registers its backends (`register`). A backend's `reasons(device=..., **info)` lists why it cannot
run a call (empty: it can); it never says whether it is fast. `priority(op, device, **info)` gives the order
to try them: CUDA tensors try cuda, triton, torch; CPU tensors cpu, torch, triton (the Triton interpreter is
for tests, so it is never chosen on the CPU unless forced); per-op rules in PRIORITY override that.
`select` takes the first backend in that order that can run the call. `FASTADAPTERS_BACKEND=<name>`
forces one backend; if it cannot run the call, the error gives its reasons and nothing falls back silently.
"""

import contextlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV_VAR = "FASTADAPTERS_BACKEND"
BACKENDS = ("triton", "cuda", "cpu", "torch")
# The dtypes the compiled kernels take (the torch backends take float64 too).
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_PRIORITY = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch", "triton")}


def _bottleneck_priority(device: torch.device, dropout_p: float = 0.0, **info) -> tuple[str, ...]:
    # On CPU tensors the C++ row-block kernels win only with dropout (their hash mask beats torch.rand);
    # without dropout the torch backend's full-size GEMMs are faster.
    if device.type == "cpu" and not dropout_p:
        return ("torch", "cpu", "triton")
    return DEFAULT_PRIORITY.get(device.type, ("triton", "torch"))


# Per-op preference rules: op -> f(device, **info) -> backend names, most preferred first.
PRIORITY: dict[str, Callable[..., tuple[str, ...]]] = {"bottleneck_adapter": _bottleneck_priority}

# Every op's backends: op name -> {backend name: Backend}, filled by `register`.
IMPLEMENTATIONS: dict[str, dict[str, "Backend"]] = {}


@dataclass(frozen=True)
class Backend:
    """One implementation of an op.

    `impl` is the object holding its functions, or the name of a module imported on first use (so
    triton is only imported when a Triton backend runs). `reasons(device=..., **info)` lists why the
    backend cannot run a call; an empty list means it can.
    """

    name: str
    impl: object
    reasons: Callable[..., list[str]]

    def module(self):
        impl = self.impl
        if isinstance(impl, str):
            module = _MODULES.get(impl)
            if module is None:
                module = _MODULES[impl] = importlib.import_module(impl)
            return module
        return impl


_MODULES: dict[str, object] = {}  # Backend.module's imports, so a call does not go through importlib


def register(op: str, backends: dict[str, Backend]) -> dict[str, Backend]:
    """Registers `op`'s backends (name -> Backend) for `select` and `backend_for`; returns them."""
    unknown = set(backends) - set(BACKENDS)
    if unknown:
        raise ValueError(f"{op}: unknown backend names {sorted(unknown)}; expected names in {BACKENDS}")
    IMPLEMENTATIONS[op] = backends
    return backends


def traced(x: torch.Tensor) -> bool:
    """Whether this call is being traced (torch.compile, export, fake or meta tensors, functorch
    transforms), where only the custom op works; eager calls may skip the custom op's wrapper, whose
    per-call cost (pytree flattening, redispatch) is 0.1-0.2 ms."""
    return (
        torch.compiler.is_compiling()
        or type(x) not in (torch.Tensor, torch.nn.Parameter)
        or x.device.type == "meta"
        or torch._C._are_functorch_transforms_active()
    )


def no_reasons(device, **info) -> list[str]:
    """The torch backends: they run every call."""
    return []


def triton_reasons(device: torch.device, **info) -> list[str]:
    """Why Triton cannot run on `device`: not installed, or CPU tensors without the interpreter."""
    from fastadapters.kernels import HAS_TRITON, INTERPRET

    if not HAS_TRITON:
        return ["triton is not installed"]
    if info.get("dtype") not in (None, *KERNEL_DTYPES):
        return [f"the Triton kernels take {[str(d) for d in KERNEL_DTYPES]}, got {info['dtype']}"]
    if device.type == "cpu" and not INTERPRET:
        return ["CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"]
    if device.type not in ("cpu", "cuda"):
        return [f"device {device.type} is not supported"]
    return []


def extension_reasons(device: torch.device, kind: str, op: str | None = None) -> list[str]:
    """Why the compiled extension's `kind` ('cpu' or 'cuda') kernels cannot run on `device`; with `op`,
    also when the extension does not register torch.ops.fastadapters_C.<op>."""
    from fastadapters import _ext

    # Without an installed _C, the first CPU call that wants it compiles it just-in-time (once per process).
    if not _ext.AVAILABLE and not (kind == "cpu" and device.type == "cpu" and _ext.jit()):
        return [f"fastadapters._C is not built ({_ext.ERROR}); see Install in the README"]
    if device.type != kind:
        return [f"needs {kind} tensors, got {device.type}"]
    if kind == "cuda" and not _ext.has_cuda():
        return ["fastadapters._C was built without CUDA kernels"]
    if op is not None and not _ext.has_op(op):
        return [f"fastadapters._C has no {op} kernel"]
    return []


def extension(kind: str, op: str) -> Callable[..., list[str]]:
    """The `reasons` of a backend that runs torch.ops.fastadapters_C.<op> on `kind` tensors."""

    def reasons(device, dtype=None, **info) -> list[str]:
        why = extension_reasons(device, kind, op)
        if dtype is not None and dtype not in KERNEL_DTYPES:
            why.append(f"the compiled kernels take {[str(d) for d in KERNEL_DTYPES]}, got {dtype}")
        return why

    return reasons


def forced_backend() -> str | None:
    name = os.environ.get(ENV_VAR) or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"{ENV_VAR}={name!r} is not a backend; expected one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Forces backend `name` (or lifts the force with None) inside the block, via FASTADAPTERS_BACKEND."""
    old = os.environ.get(ENV_VAR)
    if name is None:
        os.environ.pop(ENV_VAR, None)
    else:
        os.environ[ENV_VAR] = name
    try:
        forced_backend()
        yield
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old


def priority(op: str, device: torch.device, **info) -> tuple[str, ...]:
    """Backend names for `op` on `device`, most preferred first (the order `select` tries them in)."""
    rule = PRIORITY.get(op)
    if rule is not None:
        return rule(device, **info)
    return DEFAULT_PRIORITY.get(device.type, ("triton", "torch"))


def select(op: str, device: torch.device, **info) -> Backend:
    """Returns the backend that runs `op` on `device`, or raises RuntimeError listing every reason."""
    backends = IMPLEMENTATIONS[op]
    forced = forced_backend()
    if forced is not None:
        backend = backends.get(forced)
        why = ["op has no such backend"] if backend is None else backend.reasons(device=device, **info)
        if why:
            raise RuntimeError(f"{op}: {ENV_VAR}={forced} cannot run this call: " + "; ".join(why))
        return backend
    all_reasons = []
    for name in priority(op, device, **info):
        backend = backends.get(name)
        if backend is None:
            continue
        why = backend.reasons(device=device, **info)
        if not why:
            return backend
        all_reasons.append(f"{name}: " + "; ".join(why))
    raise RuntimeError(f"{op}: no backend supports this call: " + " | ".join(all_reasons))


def backend_for(op: str, device="cpu", dtype: torch.dtype = torch.float32, **info) -> str:
    """The name of the backend that would run a call of `op` on `device` and `dtype` (FASTADAPTERS_BACKEND
    included); raises RuntimeError with every backend's reasons when none can.

    op: a public op's name ("lora_linear", "bottleneck_adapter", "multi_lora_linear",
    "multi_bottleneck_adapter", "prefix_attention"); info: what the op passes its backends, e.g.
    bottleneck=32, dropout_p=0.1 for the bottleneck adapter, head_dim=64 for prefix attention.
    """
    if op not in IMPLEMENTATIONS:
        raise ValueError(f"op must be one of {sorted(IMPLEMENTATIONS)}, got {op!r}")
    return select(op, torch.device(device), dtype=dtype, **info).name
