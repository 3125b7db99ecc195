"""The "cpu" backend of the bottleneck op: the C++ kernels of fastadapters._C (csrc/cpu/bottleneck.cpp).

One row block at a time: dropout (a counter-based hash, regenerated in backward), the down-projection,
the activation, and the up-projection with scale and residual, while the block is in cache. Saves the
pre-activation z [N, b]; backward recomputes f(z) and f'(z) from it. Implements the interface at the top
of fastadapters/ops/bottleneck.py.
"""

import torch

from fastadapters.ops._cpu_lora import dropout_mask  # noqa: F401  (the same hash as the LoRA kernels)
from fastadapters.ops._dispatch import forced_backend

SAVES_BOTTLENECK = True
ACTIVATIONS = {"tanh": 0, "relu": 1, "gelu": 2, "silu": 3, "sigmoid": 4}

# Forward+backward, d=1024, N=2048, b=256, tanh, fp32, one thread, CPU time, interleaved rounds on the 2-core
# development machine (ms, cpu vs torch backend). Without dropout the torch backend's full-size MKL GEMMs
# beat the row-block kernels; with dropout the hash mask beats torch.rand and the cpu backend wins.
MEASURED_MS = {"no dropout": (135.7, 121.5), "dropout 0.1 (gelu)": (188.5, 217.9)}


def slower_reasons(dropout_p: float | None = None, **info) -> list[str]:
    """Why dispatch should pass over this backend for a call (empty when forced, or where it is faster).

    A capability probe that gives no dropout_p gets no such reason; the op always passes its dropout_p.
    """
    if dropout_p is None or dropout_p > 0.0 or forced_backend() == "cpu":
        return []
    cpu_ms, torch_ms = MEASURED_MS["no dropout"]
    return [
        "cpu backend is slower than torch for this op without dropout on this machine (measured "
        f"{cpu_ms} vs {torch_ms} ms, fwd+bwd d=1024 N=2048 b=256); force it with FASTADAPTERS_BACKEND=cpu"
    ]


def _seed(seed):
    return -1 if seed is None else int(seed)


def _scale(scale):
    """(scale_tensor, scale_float) as the C op takes them."""
    return (scale, 1.0) if isinstance(scale, torch.Tensor) else (None, float(scale))


def forward(h, down, up, scale, activation, dropout_p, seed, residual):
    scale_tensor, scale_f = _scale(scale)
    out, z = torch.ops.fastadapters_C.bottleneck_forward(
        h, down, up, scale_tensor, scale_f, ACTIVATIONS[activation], float(dropout_p), _seed(seed), residual
    )
    return out, z


def backward(grad, h, down, up, saved, scale, activation, dropout_p, seed, has_residual, needs):
    scale_tensor, scale_f = _scale(scale)
    flags = [int(bool(n)) for n in needs]
    act, p, s = ACTIVATIONS[activation], float(dropout_p), _seed(seed)
    dh, d_down, d_up, d_scale = torch.ops.fastadapters_C.bottleneck_backward(
        grad, h, down, up, saved, scale_tensor, scale_f, act, p, s, bool(has_residual), flags
    )
    return tuple(g if n else None for g, n in zip((dh, d_down, d_up, d_scale), needs))
