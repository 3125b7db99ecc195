"""The LoRA convolution op (PEFT's lora.Conv1d/2d/3d): y = conv(x, W) + b + scale · conv₁ₓ₁(conv(x, A), B).

weight W: [out, in, *k]; lora_a A: [r, in, *k] (a conv with W's kernel, stride and padding); lora_b B:
[out, r, 1, …] (a 1×1 conv). Forward folds the update into the kernel, W' = W + scale · B A (out·in·k·r
flops, small next to the convolution), and runs one convolution instead of three. Backward saves only x:
dx from W' in one transposed convolution, dB = scale · Σ dy tᵀ and dA from the rank-r convolution
t = conv(x, A) regenerated, dW and db only when asked. Dilation 1, one group, zero padding given as
numbers (PEFT's lora_A takes neither the base's dilation nor its groups). One backend: torch.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastadapters.ops import _checks as C
from fastadapters.ops._autograd import Autograd, Op
from fastadapters.ops.lora import LORA_DTYPES

_CONV = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _merged(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """W + scale · B A as a kernel of W's shape."""
    flat = torch.addmm(weight.reshape(weight.shape[0], -1), lora_b.flatten(1), lora_a.flatten(1), alpha=scale)
    return flat.view(weight.shape)


def _forward(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],  # noqa: UP045
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    stride: list[int],
    padding: list[int],
) -> Tensor:
    return _CONV[weight.dim()](x, _merged(weight, lora_a, lora_b, scale), bias, stride, padding)


def _fake(x, weight, bias, lora_a, lora_b, scale, stride, padding):
    spatial = [(n + 2 * p - k) // s + 1 for n, p, k, s in zip(x.shape[2:], padding, weight.shape[2:], stride)]
    return x.new_empty(x.shape[0], weight.shape[0], *spatial)


def _conv_backward(dy, x, weight, stride, padding, mask):
    d = weight.dim() - 2
    return torch.ops.aten.convolution_backward(
        dy, x, weight, None, stride, padding, [1] * d, False, [0] * d, 1, mask
    )


def _backward_forward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    stride: list[int],
    padding: list[int],
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dlora_a, dlora_b), empty where `needs` (x, weight, bias, A, B) is False."""
    need_x, need_w, need_b, need_a, need_lb = needs
    # Separate empty tensors: a custom op's outputs must not alias one another.
    dx, dw, db, da, dlb = (x.new_empty(0) for _ in range(5))
    if need_x or need_w or need_b:
        merged = _merged(weight, lora_a, lora_b, scale)
        gx, gw, gb = _conv_backward(dy, x, merged, stride, padding, [need_x, need_w, need_b])
        dx, dw, db = (g if n else e for g, n, e in zip((gx, gw, gb), (need_x, need_w, need_b), (dx, dw, db)))
    if need_a or need_lb:
        t = _CONV[weight.dim()](x, lora_a, None, stride, padding)  # [N, r, *L], regenerated
        dy3, t3 = dy.flatten(2), t.flatten(2)
        if need_lb:
            dlb = torch.einsum("nol,nrl->or", dy3, t3).mul_(scale).view(lora_b.shape)
        if need_a:
            dt = torch.einsum("or,nol->nrl", lora_b.flatten(1), dy3).mul_(scale).view(t.shape)
            da = _conv_backward(dt, x, lora_a, stride, padding, [False, True, False])[1]
    return dx, dw, db, da, dlb


def _backward_fake(dy, x, weight, lora_a, lora_b, scale, stride, padding, needs):
    like = [x, weight, weight.new_empty(weight.shape[0]), lora_a, lora_b]
    return tuple(t.new_empty(t.shape) if n else x.new_empty(0) for t, n in zip(like, needs))


def _setup(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, stride, padding = inputs
    ctx.needs = [
        x.requires_grad,
        weight.requires_grad,
        bias is not None and bias.requires_grad,
        lora_a.requires_grad,
        lora_b.requires_grad,
    ]
    ctx.scale, ctx.stride, ctx.padding = scale, stride, padding
    ctx.save_for_backward(x, weight, lora_a, lora_b)


def _backward(ctx, grads, run):
    x, weight, lora_a, lora_b = ctx.saved_tensors
    dy = grads[0]
    if dy is None:
        return (None,) * 8
    out = run(dy, x, weight, lora_a, lora_b, ctx.scale, ctx.stride, ctx.padding, ctx.needs)
    return (*(g if n else None for g, n in zip(out, ctx.needs)), None, None, None)


LORA_CONV = Op(
    "lora_conv", _forward, _fake, autograd=Autograd(_setup, _backward, _backward_forward, _backward_fake)
)


def lora_conv(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    stride,
    padding,
) -> Tensor:
    """y = conv(x, W) + b + scale · conv₁ₓ₁(conv(x, A), B), every conv with W's stride and padding (B: 1×1).

    x: [N, in, *S] (1, 2 or 3 spatial dims); weight: [out, in, *k]; bias: [out] or None; lora_a: [r, in, *k];
    lora_b: [out, r, 1, …]; stride, padding: ints or one int per spatial dim (zero padding, dilation 1, one
    group). All tensors share x's dtype and device.
    """
    w = C.check_tensor("weight", weight, dtypes=LORA_DTYPES)
    if w.dim() not in _CONV:
        raise ValueError(
            f"weight must be a 1-, 2- or 3-d convolution kernel [out, in, *k], got {C.describe(w)}"
        )
    d = w.dim() - 2
    C.check_tensor("x", x, ndim=d + 2, dtypes=LORA_DTYPES)
    C.check_like("weight", w, "x", x)
    C.check_shape("x", x, (x.shape[0], w.shape[1], *x.shape[2:]), "N, in, *S")
    if bias is not None:
        C.check_tensor("bias", bias, ndim=1, dtypes=LORA_DTYPES)
        C.check_like("bias", bias, "x", x)
        C.check_shape("bias", bias, (w.shape[0],), "out")
    a = C.check_tensor("lora_a", lora_a, ndim=d + 2, dtypes=LORA_DTYPES)
    C.check_like("lora_a", a, "x", x)
    C.check_shape("lora_a", a, (a.shape[0], *w.shape[1:]), "rank, in, *k")
    b = C.check_tensor("lora_b", lora_b, ndim=d + 2, dtypes=LORA_DTYPES)
    C.check_like("lora_b", b, "x", x)
    C.check_shape("lora_b", b, (w.shape[0], a.shape[0], *[1] * d), "out, rank, 1, …")
    scale = C.check_scale("scale", scale)

    def per_dim(name, v, low):
        v = [v] * d if isinstance(v, int) else list(v)
        if len(v) != d or not all(isinstance(i, int) and i >= low for i in v):
            raise ValueError(f"{name} must be an int >= {low} or {d} of them, got {v!r}")
        return v

    return LORA_CONV(
        x, weight, bias, lora_a, lora_b, scale, per_dim("stride", stride, 1), per_dim("padding", padding, 0)
    )
