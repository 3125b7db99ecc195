"""The "cpu" backend of the LoRA op: the C++ kernels of fastadapters._C (csrc/cpu/lora.cpp).

The shrink reads x once with the dropout mask computed inline (a counter-based hash, so backward
regenerates it); the expand is written together with the bias, and ATen's base GEMM then accumulates
into it (beta = 1). Backward reads dy, t and x once per row block for ds, dA, dB and the low-rank part of
dx, then ATen adds dy W. Implements the interface documented at the top of fastadapters/ops/lora.py.
"""

import torch


def _ops():
    return torch.ops.fastadapters_C


def _seed(seed: int | None) -> int:
    return -1 if seed is None else int(seed)


def dropout_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The keep mask of the CPU kernels for a tensor of `shape` (rows = leading dims flattened)."""
    return _ops().dropout_mask(list(shape), float(dropout_p), _seed(seed)).to(device)


def forward(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed):
    ys, t = _ops().lora_forward(
        x,
        list(weights),
        list(biases),
        list(lora_as),
        list(lora_bs),
        [float(s) for s in scales],
        float(dropout_p),
        _seed(seed),
    )
    return list(ys), t


def backward(dys, x, weights, lora_as, lora_bs, t, scales, dropout_p, seed, needs):
    need_x, need_w, need_b, need_a, need_lb = needs
    flags = [int(bool(f)) for f in (need_x, *need_w, *need_b, *need_a, *need_lb)]
    dx, dws, dbs, dlas, dlbs = _ops().lora_backward(
        list(dys),
        x,
        list(weights),
        list(lora_as),
        list(lora_bs),
        t,
        [float(s) for s in scales],
        float(dropout_p),
        _seed(seed),
        flags,
    )

    def keep(grads, flags):
        return [g if n else None for g, n in zip(grads, flags)]

    return (
        dx if need_x else None,
        keep(dws, need_w),
        keep(dbs, need_b),
        keep(dlas, need_a),
        keep(dlbs, need_lb),
    )
