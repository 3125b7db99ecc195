"""Plain-PyTorch ground truth for every op, computed in fp32 and cast back to the input dtype.

Tests and benchmarks both import these, so they cannot drift apart. They favour clarity over speed.
"""

import torch
from torch import Tensor


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_mask: Tensor | None = None,
) -> Tensor:
    """y = x Wᵀ + b + scale · ((x ⊙ dropout_mask) Aᵀ) Bᵀ.

    x: [..., d_in]; weight: [d_out, d_in]; bias: [d_out] or None; lora_a: [r, d_in]; lora_b: [d_out, r];
    dropout_mask: like x, the dropout multiplier (0 or 1/(1-p)), or None for no dropout.
    """
    xf = x.float()
    y = xf @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    xd = xf if dropout_mask is None else xf * dropout_mask.float()
    y = y + scale * ((xd @ lora_a.float().T) @ lora_b.float().T)
    return y.to(x.dtype)
