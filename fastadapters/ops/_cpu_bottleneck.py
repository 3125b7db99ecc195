"""The "cpu" backend of the bottleneck op: the C++ kernels of fastadapters._C (csrc/cpu/bottleneck.cpp).

One row block at a time: dropout (a counter-based hash, regenerated in backward), the down-projection,
the activation, and the up-projection with scale and residual, while the block is in cache. Saves the
pre-activation z [N, b]; backward recomputes f(z) and f'(z) from it. Implements the interface at the top
of fastadapters/ops/bottleneck.py.
"""

import torch

from fastadapters.ops._activations import ACTIVATIONS
from fastadapters.ops._cpu_lora import dropout_mask  # noqa: F401  (the same hash as the LoRA kernels)

SAVES_BOTTLENECK = True


def _seed(seed):
    return -1 if seed is None else int(seed)


def _scale(scale):
    """(scale_tensor, scale_float) as the C op takes them."""
    return (scale, 1.0) if isinstance(scale, torch.Tensor) else (None, float(scale))


def forward(h, down, up, scale, activation, dropout_p, seed, residual):
    scale_tensor, scale_f = _scale(scale)
    out, z = torch.ops.fastadapters_C.bottleneck_forward(
        h,
        down,
        up,
        scale_tensor,
        scale_f,
        ACTIVATIONS.index(activation),
        float(dropout_p),
        _seed(seed),
        residual,
    )
    return out, z


def backward(grad, h, down, up, saved, scale, activation, dropout_p, seed, has_residual, needs):
    scale_tensor, scale_f = _scale(scale)
    flags = [int(bool(n)) for n in needs]
    act, p, s = ACTIVATIONS.index(activation), float(dropout_p), _seed(seed)
    dh, d_down, d_up, d_scale = torch.ops.fastadapters_C.bottleneck_backward(
        grad, h, down, up, saved, scale_tensor, scale_f, act, p, s, bool(has_residual), flags
    )
    return tuple(g if n else None for g, n in zip((dh, d_down, d_up, d_scale), needs))
