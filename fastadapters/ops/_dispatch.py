"""Backend dispatch: each backend declares what it supports; the first that supports a call runs it.

Priority per device: CUDA tensors try cuda, triton, torch; CPU tensors try cpu, torch, triton (the
Triton interpreter is for tests, so it is never chosen on the CPU unless forced).
`FASTADAPTERS_BACKEND=<name>` forces one backend; if it cannot run the call, the error gives its
reasons and nothing falls back silently.
"""

import contextlib
import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENV_VAR = "FASTADAPTERS_BACKEND"
BACKENDS = ("triton", "cuda", "cpu", "torch")
PRIORITY = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch", "triton")}


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
        if isinstance(self.impl, str):
            return importlib.import_module(self.impl)
        return self.impl


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


def triton_reasons(device: torch.device) -> list[str]:
    """Why Triton cannot run on `device`: not installed, or CPU tensors without the interpreter."""
    from fastadapters.kernels import HAS_TRITON, INTERPRET

    if not HAS_TRITON:
        return ["triton is not installed"]
    if device.type == "cpu" and not INTERPRET:
        return ["CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"]
    if device.type not in ("cpu", "cuda"):
        return [f"device {device.type} is not supported"]
    return []


def extension_reasons(device: torch.device, kind: str) -> list[str]:
    """Why the compiled extension's `kind` ('cpu' or 'cuda') kernels cannot run on `device`."""
    from fastadapters import _ext

    if not _ext.AVAILABLE:
        return [f"fastadapters._C is not built ({_ext.ERROR}); see FASTADAPTERS_SKIP_EXT in the README"]
    if device.type != kind:
        return [f"needs {kind} tensors, got {device.type}"]
    if kind == "cuda" and not _ext.has_cuda():
        return ["fastadapters._C was built without CUDA kernels"]
    return []


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


def select(op: str, backends: dict[str, Backend], device: torch.device, **info) -> Backend:
    """Returns the backend that runs `op` on `device`, or raises RuntimeError listing every reason."""
    forced = forced_backend()
    if forced is not None:
        backend = backends.get(forced)
        why = ["op has no such backend"] if backend is None else backend.reasons(device=device, **info)
        if why:
            raise RuntimeError(f"{op}: {ENV_VAR}={forced} cannot run this call: " + "; ".join(why))
        return backend
    all_reasons = []
    for name in PRIORITY.get(device.type, ("triton", "torch")):
        backend = backends.get(name)
        if backend is None:
            continue
        why = backend.reasons(device=device, **info)
        if not why:
            return backend
        all_reasons.append(f"{name}: " + "; ".join(why))
    raise RuntimeError(f"{op}: no backend supports this call: " + " | ".join(all_reasons))
