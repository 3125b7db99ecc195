"""The bottleneck adapter op: out = residual + scale · up(f(down(drop(h)))), residual = h (series) by default.

One custom op, `fastadapters::bottleneck_adapter`, with an explicit backward op. The parallel form passes the
base layer's output as `residual`; the series form adds h itself. `scale` is a float, or a 0-dim tensor
(LLM-Adapters' scaling="learned"), which then gets a gradient.

Backends implement the interface below on 2-D inputs (h is [N, d_in] with unit column stride):
    forward(h, down, up, scale, activation, dropout_p, seed, residual) -> (out, saved)
    backward(grad, h, down, up, saved, scale, activation, dropout_p, seed, has_residual, needs)
        -> (dh, d_down, d_up, d_scale), None where `needs` (h, down, up, scale) says not needed
    dropout_mask(shape, dropout_p, seed, device) -> bool keep mask, the one forward/backward use
    SAVES_BOTTLENECK: whether `saved` is an [N, b] tensor (else it is empty and backward recomputes z)
`scale` is a float or a 0-dim tensor; `seed` a Python int or None (no dropout); `residual` None or [N, d_out].
The backward runs on the backend that ran the forward, so the dropout mask and `saved` always match.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastadapters.ops import _activations
from fastadapters.ops import _checks as C
from fastadapters.ops._activations import ACTIVATIONS  # noqa: F401  (public here: the names the op takes)
from fastadapters.ops._autograd import Autograd, Op
from fastadapters.ops._dispatch import Backend, extension, no_reasons, register, select, triton_reasons

# A dispatch rule, not a kernel limit: the Triton two-kernel path is tested up to this bottleneck size.
TRITON_MAX_BOTTLENECK = 1024


class TorchBottleneck:
    """The portable fast path: the up-projection, scale and residual in one addmm; the activation derivative
    from one fused aten kernel; saved: h and one [N, b] tensor (a = f(z) for tanh/relu/sigmoid, whose
    derivatives follow from a, else z); dropout masks regenerated from the seed."""

    SAVES_BOTTLENECK = True
    # Activations whose derivative is a function of their output a = f(z): save a, not z.
    _FROM_OUTPUT = {"tanh", "relu", "sigmoid"}

    @staticmethod
    def dropout_mask(shape, dropout_p: float, seed: int, device) -> Tensor:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return torch.rand(shape, generator=gen, device=device) >= dropout_p

    @staticmethod
    def _dropped(h: Tensor, dropout_p: float, seed: int | None) -> Tensor:
        if seed is None or dropout_p == 0.0:
            return h
        keep = TorchBottleneck.dropout_mask(h.shape, dropout_p, seed, h.device)
        return h.masked_fill(~keep, 0).mul_(1.0 / (1.0 - dropout_p))

    @staticmethod
    def _activate_(z: Tensor, activation: str) -> Tensor:
        """f(z), in place on z where torch has an in-place kernel."""
        if activation == "tanh":
            return z.tanh_()
        if activation == "relu":
            return z.relu_()
        if activation == "sigmoid":
            return z.sigmoid_()
        if activation == "silu":
            return F.silu(z)
        return F.gelu(z)

    @staticmethod
    def _activation_backward(grad: Tensor, saved: Tensor, activation: str) -> Tensor:
        """grad ⊙ f'(z) in one aten kernel, from a = f(z) (tanh, relu, sigmoid) or from z (gelu, silu)."""
        aten = torch.ops.aten
        if activation == "tanh":
            return aten.tanh_backward(grad, saved)
        if activation == "sigmoid":
            return aten.sigmoid_backward(grad, saved)
        if activation == "relu":
            return aten.threshold_backward(grad, saved, 0)
        if activation == "silu":
            return aten.silu_backward(grad, saved)
        return aten.gelu_backward(grad, saved)

    @staticmethod
    def forward(h, down, up, scale, activation, dropout_p, seed, residual):
        z = TorchBottleneck._dropped(h, dropout_p, seed) @ down.T
        keep_z = activation not in TorchBottleneck._FROM_OUTPUT
        a = TorchBottleneck._activate_(z, activation)
        res = h if residual is None else residual
        if isinstance(scale, Tensor):
            out = torch.addmm(res, a * scale, up.T)
        else:
            out = torch.addmm(res, a, up.T, alpha=scale)
        return out, (z if keep_z else a)

    @staticmethod
    def backward(grad, h, down, up, saved, scale, activation, dropout_p, seed, has_residual, needs):
        need_h, need_down, need_up, need_scale = needs
        from_output = activation in TorchBottleneck._FROM_OUTPUT
        # a = f(z) again for gelu/silu (saved holds z; their functional forms leave it intact).
        a = saved if from_output else (F.silu(saved) if activation == "silu" else F.gelu(saved))
        scaled = isinstance(scale, Tensor) or scale != 1.0
        g_up = grad @ up  # dL/da / scale
        d_scale = torch.dot(g_up.reshape(-1), a.reshape(-1)) if need_scale else None
        d_up = None
        if need_up:
            d_up = torch.mm(grad.T, a)
            if scaled:
                d_up.mul_(scale)
        d_down = dh = None
        if need_h or need_down:
            dz = TorchBottleneck._activation_backward(g_up, saved, activation)
            if scaled:
                dz.mul_(scale)
            if need_down:
                d_down = dz.T @ TorchBottleneck._dropped(h, dropout_p, seed)
            if need_h:
                if seed is not None and dropout_p > 0.0:
                    keep = TorchBottleneck.dropout_mask(h.shape, dropout_p, seed, h.device)
                    dh = (dz @ down).masked_fill_(~keep, 0).mul_(1.0 / (1.0 - dropout_p))
                    if not has_residual:
                        dh.add_(grad)
                elif has_residual:
                    dh = dz @ down
                else:
                    dh = torch.addmm(grad, dz, down)
        return dh, d_down, d_up, d_scale


def _triton_reasons(device, bottleneck: int = 1, **info) -> list[str]:
    why = triton_reasons(device, **info)
    if bottleneck > TRITON_MAX_BOTTLENECK:
        why = why + [f"bottleneck {bottleneck} > {TRITON_MAX_BOTTLENECK}, the kernels' limit"]
    return why


IMPLEMENTATIONS = register(
    "bottleneck_adapter",
    {
        "triton": Backend("triton", "fastadapters.kernels.bottleneck", _triton_reasons),
        "cpu": Backend("cpu", "fastadapters.ops._cpu_bottleneck", extension("cpu", "bottleneck_forward")),
        "cuda": Backend("cuda", "fastadapters.ops._cuda_bottleneck", extension("cuda", "bottleneck_forward")),
        "torch": Backend("torch", TorchBottleneck, no_reasons),
    },
)
BACKENDS = IMPLEMENTATIONS  # the name this table had before (ops.BACKENDS is the tuple of backend names)


def _backend(h: Tensor, bottleneck: int, dropout_p: float) -> Backend:
    return select("bottleneck_adapter", h.device, dtype=h.dtype, bottleneck=bottleneck, dropout_p=dropout_p)


def _forward(
    h: Tensor,
    down_weight: Tensor,
    up_weight: Tensor,
    scale_tensor: Optional[Tensor],  # noqa: UP045
    scale: float,
    activation: str,
    dropout_p: float,
    seed: Optional[Tensor],  # noqa: UP045
    residual: Optional[Tensor],  # noqa: UP045
) -> tuple[Tensor, Tensor]:
    """The selected backend's forward on h flattened to 2-D: (out, saved)."""
    d_out = up_weight.shape[0]
    res2 = None if residual is None else residual.reshape(-1, d_out)
    out, saved = (
        _backend(h, down_weight.shape[0], dropout_p)
        .module()
        .forward(
            h.reshape(-1, h.shape[-1]),
            down_weight,
            up_weight,
            scale if scale_tensor is None else scale_tensor,
            activation,
            dropout_p,
            None if seed is None else int(seed),
            res2,
        )
    )
    return out.reshape(*h.shape[:-1], d_out), saved


def _fake(h, down_weight, up_weight, scale_tensor, scale, activation, dropout_p, seed, residual):
    b = down_weight.shape[0]
    n = h.numel() // h.shape[-1]
    saves = _backend(h, b, dropout_p).module().SAVES_BOTTLENECK
    return h.new_empty(*h.shape[:-1], up_weight.shape[0]), (h.new_empty(n, b) if saves else h.new_empty(0))


def _backward_forward(
    grad: Tensor,
    h: Tensor,
    down_weight: Tensor,
    up_weight: Tensor,
    saved: Tensor,
    scale_tensor: Optional[Tensor],  # noqa: UP045
    scale: float,
    activation: str,
    dropout_p: float,
    seed: Optional[Tensor],  # noqa: UP045
    has_residual: bool,
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dh, d_down, d_up, d_scale) from the backend that ran forward; empty where `needs` is False."""
    dh, dd, du, ds = (
        IMPLEMENTATIONS[backend]
        .module()
        .backward(
            grad.reshape(-1, grad.shape[-1]),
            h.reshape(-1, h.shape[-1]),
            down_weight,
            up_weight,
            saved,
            scale if scale_tensor is None else scale_tensor,
            activation,
            dropout_p,
            None if seed is None else int(seed),
            has_residual,
            tuple(needs),
        )
    )
    empty = h.new_empty(0)
    return (
        empty if dh is None else dh.reshape(h.shape),
        empty if dd is None else dd,
        empty if du is None else du,
        empty if ds is None else ds.reshape(()),
    )


def _backward_fake(grad, h, down, up, saved, scale_t, scale, act, p, seed, has_residual, needs, backend):
    def like(flag, ref):
        return ref.new_empty(ref.shape) if flag else h.new_empty(0)

    d_scale = h.new_empty(()) if needs[3] else h.new_empty(0)
    return like(needs[0], h), like(needs[1], down), like(needs[2], up), d_scale


def _setup(ctx, inputs, output):
    h, down_weight, up_weight, scale_tensor, scale, activation, dropout_p, seed, residual = inputs
    ctx.needs = [
        h.requires_grad,
        down_weight.requires_grad,
        up_weight.requires_grad,
        scale_tensor is not None and scale_tensor.requires_grad,
        residual is not None and residual.requires_grad,
    ]
    ctx.scale, ctx.activation, ctx.dropout_p = scale, activation, dropout_p
    ctx.has_residual = residual is not None
    ctx.has_scale_tensor, ctx.has_seed = scale_tensor is not None, seed is not None
    ctx.backend = _backend(h, down_weight.shape[0], dropout_p).name
    extra = ([scale_tensor] if scale_tensor is not None else []) + ([seed] if seed is not None else [])
    ctx.save_for_backward(h, down_weight, up_weight, output[1], *extra)


def _backward(ctx, grads, run):
    h, down_weight, up_weight, saved, *extra = ctx.saved_tensors
    scale_tensor = extra.pop(0) if ctx.has_scale_tensor else None
    seed = extra[0] if ctx.has_seed else None
    grad = grads[0]  # the second output (the saved intermediate) never gets a gradient
    if grad is None:
        grad = h.new_zeros(*h.shape[:-1], up_weight.shape[0])
    needs = ctx.needs
    dh, dd, du, ds = run(
        grad, h, down_weight, up_weight, saved, scale_tensor, ctx.scale, ctx.activation, ctx.dropout_p, seed,
        ctx.has_residual, needs[:4], ctx.backend,
    )  # fmt: skip
    return (
        dh if needs[0] else None,
        dd if needs[1] else None,
        du if needs[2] else None,
        ds.reshape(scale_tensor.shape) if needs[3] else None,
        None,
        None,
        None,
        None,
        grad if needs[4] else None,
    )


_AUTOGRAD = Autograd(_setup, _backward, _backward_forward, _backward_fake)
BOTTLENECK_ADAPTER = Op("bottleneck_adapter", _forward, _fake, autograd=_AUTOGRAD)
_bottleneck_op = BOTTLENECK_ADAPTER.custom


def _check_scale(scale, h: Tensor):
    """(scale_tensor, scale_float): a 0-dim tensor like h, or a finite Python number."""
    if isinstance(scale, Tensor):
        C.check_tensor("scale", scale)
        C.check_like("scale", scale, "h", h)
        if scale.dim() != 0:
            raise ValueError(f"scale must be a float or a 0-dim tensor, got {C.describe(scale)}")
        return scale, 1.0
    return None, C.check_scale("scale", scale)


def bottleneck_adapter(
    h: Tensor,
    down_weight: Tensor,
    up_weight: Tensor,
    scale: float | Tensor,
    activation: str,
    dropout_p: float = 0.0,
    training: bool = False,
    residual: Tensor | None = None,
) -> Tensor:
    """out = residual + scale · f(drop(h) Dᵀ) Uᵀ; residual = h if None (series); dropout only when `training`.

    h: [..., d_in] (any leading dims, may be non-contiguous); down_weight D: [b, d_in]; up_weight U:
    [d_out, b]; residual: [..., d_out] with h's leading dims, or None (then d_out must equal d_in). scale:
    a float, or a 0-dim tensor that receives a gradient. activation: tanh, relu, gelu (exact erf), silu,
    sigmoid.
    All tensors share h's dtype (fp32, fp16, bf16) and device.
    """
    C.check_tensor("h", h, min_ndim=1)
    d_in = h.shape[-1]
    if d_in < 1:
        raise ValueError(f"h must have a non-empty last dimension, got {C.describe(h)}")
    down = C.check_tensor("down_weight", down_weight, ndim=2)
    C.check_like("down_weight", down, "h", h)
    b = down.shape[0]
    if b < 1:
        raise ValueError(f"down_weight must have bottleneck >= 1 rows, got {C.describe(down)}")
    C.check_shape("down_weight", down, (b, d_in), "bottleneck, d_in")
    up = C.check_tensor("up_weight", up_weight, ndim=2)
    C.check_like("up_weight", up, "h", h)
    if up.shape[1] != b:
        raise ValueError(f"up_weight must have shape (d_out, {b}) (d_out, bottleneck), got {C.describe(up)}")
    C.check_residual(residual, h, up.shape[0], "up_weight", up, (d_in, b))
    scale_tensor, scale_f = _check_scale(scale, h)
    _activations.check("activation", activation)
    p, seed = C.dropout_and_seed(dropout_p, training)
    return BOTTLENECK_ADAPTER(h, down, up, scale_tensor, scale_f, activation, p, seed, residual)[0]


def bottleneck_dropout_mask(
    shape, dropout_p: float, seed: int, device, dtype=torch.float32, bottleneck: int = 1
):
    """The keep mask the selected backend draws for (shape, p, seed), for tests and debugging."""
    probe = torch.empty(0, device=device, dtype=dtype)
    return _backend(probe, bottleneck, dropout_p).module().dropout_mask(shape, dropout_p, seed, device)
