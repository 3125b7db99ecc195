"""Input validation shared by the ops: one clear ValueError/TypeError naming the argument."""

import math

import torch
from torch import Tensor

# float64 runs on the torch backends only (as PEFT runs it; the exactness tests use it): the compiled and
# Triton backends give it as a reason they cannot run a call (_dispatch.KERNEL_DTYPES).
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(
    name: str, t, *, ndim: int | None = None, min_ndim: int | None = None, dtypes: tuple = FLOAT_DTYPES
) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = [str(d).removeprefix("torch.") for d in dtypes]
        raise TypeError(f"{name} must be {', '.join(names[:-1])} or {names[-1]}, got {describe(t)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got {describe(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got {describe(t)}")
    return t


def check_shape(name: str, t: Tensor, expected: tuple, meaning: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} ({meaning}), got {describe(t)}")


def check_like(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    """t must share ref's device and dtype."""
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device {ref.device}, got {describe(t)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {describe(t)}")


def check_scale(name: str, scale) -> float:
    if isinstance(scale, Tensor) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"{name} must be a finite Python float, got {scale!r}")
    return float(scale)


def check_dropout(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


def dropout_and_seed(dropout_p, training: bool) -> tuple[float, Tensor | None]:
    """(dropout probability in effect, fresh seed or None): dropout_p checked, active only when training."""
    p = check_dropout(dropout_p)
    if not training or p == 0.0:
        return 0.0, None
    return p, new_seed()


def new_seed() -> Tensor:
    """A dropout seed drawn from torch's default generator (so torch.manual_seed reproduces it)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64)


def _as_list(name: str, values, of: str) -> list:
    if isinstance(values, Tensor):
        values = values.tolist()
    try:
        return list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of {of}, got {type(values).__name__}") from None


def int_list(name: str, values) -> list[int]:
    """values (a sequence or tensor) as a list of ints >= 0: one rank or bottleneck size per adapter."""
    out = _as_list(name, values, "ints")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must hold ints >= 0 (0 = no LoRA for that adapter), got {out!r}")
    return out


def float_list(name: str, values, n: int) -> list[float]:
    """values (a sequence or tensor) as a list of n finite floats: one scale per adapter."""
    out = _as_list(name, values, "floats")
    if len(out) != n:
        raise ValueError(f"{name} must have one value per adapter ({n}), got {len(out)}")
    return [check_scale(f"{name}[{i}]", v) for i, v in enumerate(out)]


def check_residual(residual, h: Tensor, d_out: int, up_name: str, up: Tensor, series_shape: tuple) -> None:
    """The series form (residual None: h is added, so d_out must be h's d_in and `up` have series_shape) or
    the parallel form (residual: [*h's leading dims, d_out], like h)."""
    if residual is None:
        if d_out != h.shape[-1]:
            raise ValueError(
                f"{up_name} must have shape {tuple(series_shape)} for the series form (residual=None adds "
                f"h), got {describe(up)}; pass residual for the parallel form"
            )
        return
    check_tensor("residual", residual, min_ndim=1)
    check_like("residual", residual, "h", h)
    check_shape("residual", residual, (*h.shape[:-1], d_out), "h's leading dims, d_out")


def check_features(name: str, t: Tensor, meaning: str = "d_in") -> None:
    """t's last dimension (its features) must be >= 1: an empty one has no defined product."""
    if t.shape[-1] < 1:
        raise ValueError(f"{name} must have a last dimension ({meaning}) >= 1, got {describe(t)}")
