"""The LoRA linear op: y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ, and its grouped form.

One custom op, `fastadapters::lora_linear`, serves both: it takes lists of (weight, bias, A, B, scale)
sharing one input x. The shrink t = drop(x) [A_1; …; A_k]ᵀ is computed once; each output then gets
its base GEMM with the expand scale_i · t_i B_iᵀ added in place. Backward saves only x and t (plus the
frozen weights it already holds) and regenerates the dropout mask from a seed.

Backends implement the interface below on 2-D inputs (x is [N, d_in], possibly strided):
    forward(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed) -> (ys, t)
    backward(dys, x, weights, lora_as, lora_bs, t, scales, dropout_p, seed, needs)
        -> (dx, dweights, dbiases, dlora_as, dlora_bs), None where `needs` says not needed
    dropout_mask(shape, dropout_p, seed, device) -> bool keep mask, the one forward/backward use
`seed` is a Python int or None (no dropout); `needs` is (x, [weights], [biases], [lora_as], [lora_bs]).
"""

from typing import Optional

import torch
from torch import Tensor

from fastadapters.ops import _checks as C
from fastadapters.ops._dispatch import Backend, extension_reasons, select, triton_reasons


class TorchLora:
    """The portable fast path: in-place addmm, the least saved, the mask regenerated from the seed."""

    @staticmethod
    def dropout_mask(shape, dropout_p: float, seed: int, device) -> Tensor:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return torch.rand(shape, generator=gen, device=device) >= dropout_p

    @staticmethod
    def _dropped(x: Tensor, dropout_p: float, seed: int | None) -> Tensor:
        if seed is None or dropout_p == 0.0:
            return x
        keep = TorchLora.dropout_mask(x.shape, dropout_p, seed, x.device)
        return x.masked_fill(~keep, 0).mul_(1.0 / (1.0 - dropout_p))

    @staticmethod
    def forward(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed):
        a_cat = lora_as[0] if len(lora_as) == 1 else torch.cat(lora_as)
        t = TorchLora._dropped(x, dropout_p, seed) @ a_cat.T
        ys, start = [], 0
        for w, b, lora_b, s in zip(weights, biases, lora_bs, scales):
            rank = lora_b.shape[1]
            y = x @ w.T if b is None else torch.addmm(b, x, w.T)
            y.addmm_(t[:, start : start + rank], lora_b.T, alpha=s)
            ys.append(y)
            start += rank
        return ys, t

    @staticmethod
    def backward(dys, x, weights, lora_as, lora_bs, t, scales, dropout_p, seed, needs):
        need_x, need_w, need_b, need_a, need_lb = needs
        ranks = [lb.shape[1] for lb in lora_bs]
        ts = t.split(ranks, dim=1)
        # ds_i = s_i · dy_i B_i: the gradient reaching the rank-r intermediate, for all members at once.
        ds = torch.cat([(dy @ lb).mul_(s) for dy, lb, s in zip(dys, lora_bs, scales)], dim=1)
        dlbs = [torch.mm(dy.T, ti).mul_(s) if n else None for dy, ti, s, n in zip(dys, ts, scales, need_lb)]
        dlas = [None] * len(lora_as)
        if any(need_a):
            xd = TorchLora._dropped(x, dropout_p, seed)
            # One GEMM per member: slices of a single [sum r, d_in] result would alias each other.
            dlas = [dsi.T @ xd if n else None for dsi, n in zip(ds.split(ranks, dim=1), need_a)]
        dx = None
        if need_x:
            a_cat = lora_as[0] if len(lora_as) == 1 else torch.cat(lora_as)
            if seed is None or dropout_p == 0.0:
                dx = ds @ a_cat
            else:
                keep = TorchLora.dropout_mask(x.shape, dropout_p, seed, x.device)
                dx = (ds @ a_cat).masked_fill_(~keep, 0).mul_(1.0 / (1.0 - dropout_p))
            for dy, w in zip(dys, weights):
                dx.addmm_(dy, w)
        dws = [torch.mm(dy.T, x) if n else None for dy, n in zip(dys, need_w)]
        dbs = [dy.sum(0) if n else None for dy, n in zip(dys, need_b)]
        return dx, dws, dbs, dlas, dlbs


def _lora_reasons(device, **info) -> list[str]:
    return []


def _cpu_reasons(device, **info) -> list[str]:
    why = extension_reasons(device, "cpu")
    if not why and not hasattr(torch.ops.fastadapters_C, "lora_forward"):
        why = ["fastadapters._C has no CPU LoRA kernel"]
    return why


BACKENDS = {
    "triton": Backend("triton", "fastadapters.kernels.lora", lambda device, **info: triton_reasons(device)),
    "cpu": Backend("cpu", "fastadapters.ops._cpu_lora", _cpu_reasons),
    "torch": Backend("torch", TorchLora, _lora_reasons),
}


def _backend(x: Tensor) -> Backend:
    return select("lora_linear", BACKENDS, x.device, dtype=x.dtype)


def _biases(biases, x: Tensor) -> list[Tensor]:
    # The custom op takes biases as a tensor list (an empty tensor for "no bias") so autograd can
    # return one gradient per entry; a list of optional tensors would be a single pytree leaf.
    return [x.new_empty(0) if b is None else b for b in biases]


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("fastadapters::lora_linear", mutates_args=())
def _lora_linear_op(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    lora_as: list[Tensor],
    lora_bs: list[Tensor],
    scales: list[float],
    dropout_p: float,
    seed: Optional[Tensor],  # noqa: UP045
) -> tuple[list[Tensor], Tensor]:
    x2 = x.reshape(-1, x.shape[-1])
    seed_int = None if seed is None else int(seed)
    biases = [None if b.numel() == 0 else b for b in biases]
    ys, t = _backend(x).module().forward(x2, weights, biases, lora_as, lora_bs, scales, dropout_p, seed_int)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys], t


@_lora_linear_op.register_fake
def _(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed):
    rank = sum(a.shape[0] for a in lora_as)
    n = x.numel() // x.shape[-1]
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights], x.new_empty(n, rank)


@torch.library.custom_op("fastadapters::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(
    dys: list[Tensor],
    x: Tensor,
    weights: list[Tensor],
    lora_as: list[Tensor],
    lora_bs: list[Tensor],
    t: Tensor,
    scales: list[float],
    dropout_p: float,
    seed: Optional[Tensor],  # noqa: UP045
    needs: list[bool],
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    k = len(weights)
    split = (needs[0], needs[1 : 1 + k], needs[1 + k : 1 + 2 * k], needs[1 + 2 * k : 1 + 3 * k], needs[1 + 3 * k :])
    x2 = x.reshape(-1, x.shape[-1])
    dys2 = [dy.reshape(-1, dy.shape[-1]) for dy in dys]
    seed_int = None if seed is None else int(seed)
    dx, dws, dbs, dlas, dlbs = _backend(x).module().backward(
        dys2, x2, weights, lora_as, lora_bs, t, scales, dropout_p, seed_int, split
    )
    dx = x.new_empty(0) if dx is None else dx.reshape(x.shape)
    return (
        dx,
        [_empty_if_none(g, x) for g in dws],
        [_empty_if_none(g, x) for g in dbs],
        [_empty_if_none(g, x) for g in dlas],
        [_empty_if_none(g, x) for g in dlbs],
    )


@_lora_linear_backward_op.register_fake
def _(dys, x, weights, lora_as, lora_bs, t, scales, dropout_p, seed, needs):
    k = len(weights)

    def like(flag, ref):
        return ref.new_empty(ref.shape) if flag else x.new_empty(0)

    return (
        like(needs[0], x),
        [like(n, w) for n, w in zip(needs[1 : 1 + k], weights)],
        [x.new_empty(w.shape[0]) if n else x.new_empty(0) for n, w in zip(needs[1 + k : 1 + 2 * k], weights)],
        [like(n, a) for n, a in zip(needs[1 + 2 * k : 1 + 3 * k], lora_as)],
        [like(n, b) for n, b in zip(needs[1 + 3 * k :], lora_bs)],
    )


def _setup_context(ctx, inputs, output):
    x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed = inputs
    ctx.needs = [
        x.requires_grad,
        *[w.requires_grad for w in weights],
        *[b.numel() > 0 and b.requires_grad for b in biases],
        *[a.requires_grad for a in lora_as],
        *[b.requires_grad for b in lora_bs],
    ]
    ctx.k, ctx.scales, ctx.dropout_p = len(weights), scales, dropout_p
    ctx.has_seed = seed is not None
    ctx.save_for_backward(x, output[1], *weights, *lora_as, *lora_bs, *([seed] if seed is not None else []))


def _backward(ctx, dys, dt):
    k = ctx.k
    x, t, *rest = ctx.saved_tensors
    weights, lora_as, lora_bs = rest[:k], rest[k : 2 * k], rest[2 * k : 3 * k]
    seed = rest[3 * k] if ctx.has_seed else None
    lead = x.shape[:-1]
    dys = [x.new_zeros(*lead, w.shape[0]) if dy is None else dy for dy, w in zip(dys, weights)]
    dx, dws, dbs, dlas, dlbs = _lora_linear_backward_op(
        list(dys), x, list(weights), list(lora_as), list(lora_bs), t, ctx.scales, ctx.dropout_p, seed, ctx.needs
    )
    needs = ctx.needs

    def pick(grads, flags):
        return [g if n else None for g, n in zip(grads, flags)]

    return (
        dx if needs[0] else None,
        pick(dws, needs[1 : 1 + k]),
        pick(dbs, needs[1 + k : 1 + 2 * k]),
        pick(dlas, needs[1 + 2 * k : 1 + 3 * k]),
        pick(dlbs, needs[1 + 3 * k :]),
        None,
        None,
        None,
    )


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


def _check_member(i: int, x: Tensor, weight, bias, lora_a, lora_b, scale, grouped: bool):
    sfx = f"[{i}]" if grouped else ""
    w = C.check_tensor(f"weight{sfx}", weight, ndim=2)
    C.check_like(f"weight{sfx}", w, "x", x)
    d_out, d_in = w.shape
    if d_in != x.shape[-1]:
        raise ValueError(f"weight{sfx} must have shape (d_out, {x.shape[-1]}) to match x, got {C.describe(w)}")
    if bias is not None:
        C.check_tensor(f"bias{sfx}", bias, ndim=1)
        C.check_like(f"bias{sfx}", bias, "x", x)
        C.check_shape(f"bias{sfx}", bias, (d_out,), "d_out")
    a = C.check_tensor(f"lora_a{sfx}", lora_a, ndim=2)
    C.check_like(f"lora_a{sfx}", a, "x", x)
    if a.shape[0] < 1:
        raise ValueError(f"lora_a{sfx} must have rank >= 1 rows, got {C.describe(a)}")
    C.check_shape(f"lora_a{sfx}", a, (a.shape[0], d_in), "rank, d_in")
    b = C.check_tensor(f"lora_b{sfx}", lora_b, ndim=2)
    C.check_like(f"lora_b{sfx}", b, "x", x)
    C.check_shape(f"lora_b{sfx}", b, (d_out, a.shape[0]), "d_out, rank")
    return C.check_scale(f"scale{sfx}", scale)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    dropout_p: float = 0.0,
    training: bool = False,
) -> Tensor:
    """y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ, dropout active only when `training`.

    x: [..., d_in] (any leading dims, may be non-contiguous); weight: [d_out, d_in]; bias: [d_out] or None;
    lora_a: [r, d_in]; lora_b: [d_out, r]. All share x's dtype (fp32, fp16, bf16) and device.
    """
    C.check_tensor("x", x, min_ndim=1)
    scale = _check_member(0, x, weight, bias, lora_a, lora_b, scale, grouped=False)
    p = C.check_dropout(dropout_p) if training else 0.0
    seed = C.new_seed() if p > 0.0 else None
    ys, _ = _lora_linear_op(x, [weight], _biases([bias], x), [lora_a], [lora_b], [scale], p, seed)
    return ys[0]


def lora_linear_grouped(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor | None],
    lora_as: list[Tensor],
    lora_bs: list[Tensor],
    scales: list[float],
    dropout_p: float = 0.0,
    training: bool = False,
) -> list[Tensor]:
    """ys[i] = x W_iᵀ + b_i + scale_i · (drop(x) A_iᵀ) B_iᵀ, with x read once for one shrink.

    x: [..., d_in]; weights[i]: [d_out_i, d_in]; biases[i]: [d_out_i] or None; lora_as[i]: [r_i, d_in];
    lora_bs[i]: [d_out_i, r_i]. One dropout mask is shared by the members (they share x).
    """
    C.check_tensor("x", x, min_ndim=1)
    k = len(weights)
    if k == 0 or not all(len(v) == k for v in (biases, lora_as, lora_bs, scales)):
        raise ValueError(
            "weights, biases, lora_as, lora_bs and scales must be non-empty lists of one length, got "
            f"{[len(v) for v in (weights, biases, lora_as, lora_bs, scales)]}"
        )
    scales = [_check_member(i, x, *m, grouped=True) for i, m in enumerate(zip(weights, biases, lora_as, lora_bs, scales))]
    p = C.check_dropout(dropout_p) if training else 0.0
    seed = C.new_seed() if p > 0.0 else None
    ys, _ = _lora_linear_op(x, list(weights), _biases(biases, x), list(lora_as), list(lora_bs), scales, p, seed)
    return ys


def lora_dropout_mask(shape, dropout_p: float, seed: int, device, dtype=torch.float32) -> Tensor:
    """The keep mask the selected backend draws for (shape, p, seed), for tests and debugging."""
    return _backend(torch.empty(0, device=device, dtype=dtype)).module().dropout_mask(shape, dropout_p, seed, device)
