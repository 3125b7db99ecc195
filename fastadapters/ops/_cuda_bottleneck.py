"""The "cuda" backend of the bottleneck op: csrc/cuda/bottleneck.cu through fastadapters._C (no Triton JIT).

Up to 64 rows (decode) run two fused launches (down + dropout + activation, then up + scale + residual);
larger batches run the projections on cuBLAS with dropout and the activation (forward and backward) in
single elementwise launches. Dropout uses the CPU kernels' hash, so the masks match across devices.
Implements the interface of fastadapters/ops/bottleneck.py (the same torch.ops.fastadapters_C ops as the
cpu backend, dispatched on the CUDA key).
"""

import torch

from fastadapters.ops._cpu_bottleneck import SAVES_BOTTLENECK, backward, forward  # noqa: F401


def dropout_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The keep mask of the CUDA kernels: the same bits as the CPU kernels' (csrc/dropout_hash.h)."""
    from fastadapters.ops._cpu_lora import dropout_mask as cpu_mask

    return cpu_mask(shape, dropout_p, seed, "cpu").to(device)
