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

import math
from typing import Optional

import torch
from torch import Tensor

from fastadapters.ops import _checks as C
from fastadapters.ops._autograd import Autograd, Op
from fastadapters.ops._dispatch import Backend, extension, no_reasons, register, select, triton_reasons


class TorchLora:
    """The portable fast path: few, large torch calls; x and t saved; the dropout mask regenerated.

    - fp32 with at least as many tokens as features (training): the low-rank update is folded into the
      frozen weight, W' = W + s·B A (d_out·d_in·r flops, instead of N·d·r for the expand), and the base GEMM
      runs on W' in forward and, for dx = dy W', in backward. No [N, d] expand is written or re-read.
      Otherwise (fp16/bf16, few tokens, dropout) the expand writes y (bias included) and the base GEMM
      accumulates into it (beta = 1, nearly free); backward writes ds A into dx the same way.
    - Dropout: the dropped positions are drawn as geometric gaps (exact i.i.d. Bernoulli(p), about p·N·d
      random numbers instead of N·d) from a Generator seeded with `seed`, and drawn again in backward;
      the 1/(1-p) factor is applied to the rank-r tensors, never to an [N, d] one.
    - dB = s·(tᵀ dy)ᵀ (MKL's faster layout for this skinny product); the dA of all group members from one
      GEMM that reads x once.
    """

    @staticmethod
    def dropped_positions(numel: int, dropout_p: float, seed: int, device) -> Tensor:
        """Sorted flat indices of the dropped elements of a tensor of `numel` elements (int64)."""
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        inv_log = 1.0 / math.log1p(-dropout_p)
        expect = numel * dropout_p
        count = int(expect + 6.0 * math.sqrt(expect * (1.0 - dropout_p)) + 64)  # one draw almost surely
        chunks, last = [], -1
        while True:
            u = torch.rand(count, generator=gen, device=device)
            # The gap to the next dropped element is Geometric(p): floor(log(1 - u) / log(1 - p)) + 1.
            gaps = torch.log1p(u.neg_()).mul_(inv_log).to(torch.int32).add_(1)
            pos = torch.cumsum(gaps, 0, dtype=torch.int64).add_(last)
            last = int(pos[-1])
            if last >= numel:
                chunks.append(pos[: int(torch.searchsorted(pos, numel))])
                return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
            chunks.append(pos)

    @staticmethod
    def dropout_mask(shape, dropout_p: float, seed: int, device) -> Tensor:
        numel = math.prod(shape)
        keep = torch.ones(numel, dtype=torch.bool, device=device)
        keep[TorchLora.dropped_positions(numel, dropout_p, seed, device)] = False
        return keep.view(shape)

    @staticmethod
    def _zero_at(t: Tensor, pos: Tensor) -> Tensor:
        """Zeroes the flat positions `pos` of the contiguous tensor t in place."""
        flat = t.view(-1)
        if flat.device.type == "cpu":
            flat.put_(pos, flat.new_zeros(()).expand(pos.shape))  # the fastest scatter on the CPU
        else:
            flat.index_fill_(0, pos, 0)
        return t

    @staticmethod
    def _merged(w: Tensor, lora_a: Tensor, lora_b: Tensor, s: float) -> Tensor:
        """W + s·B A as [d_out, d_in], computed in w's memory layout (a transposed view for Conv1D)."""
        if not w.is_contiguous() and w.T.is_contiguous():
            return torch.addmm(w.T, lora_a.T, lora_b.T, alpha=s).T
        return torch.addmm(w, lora_b, lora_a, alpha=s)

    @staticmethod
    def forward(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed):
        drop = seed is not None and dropout_p > 0.0
        a_cat = lora_as[0] if len(lora_as) == 1 else torch.cat(lora_as)
        if drop:
            xd = TorchLora._zero_at(
                torch.clone(x, memory_format=torch.contiguous_format),
                TorchLora.dropped_positions(x.numel(), dropout_p, seed, x.device),
            )
            t = torch.mm(xd, a_cat.T).mul_(1.0 / (1.0 - dropout_p))
            del xd
        else:
            t = torch.mm(x, a_cat.T)
        merge = not drop and x.dtype == torch.float32 and x.shape[0] >= x.shape[1]
        ys, start = [], 0
        for w, b, lora_a, lora_b, s in zip(weights, biases, lora_as, lora_bs, scales):
            rank = lora_b.shape[1]
            if merge:
                w_eff = TorchLora._merged(w, lora_a, lora_b, s)
                y = torch.mm(x, w_eff.T) if b is None else torch.addmm(b, x, w_eff.T)
            else:
                ti = t[:, start : start + rank]
                y = torch.mm(ti, lora_b.T).mul_(s) if b is None else torch.addmm(b, ti, lora_b.T, alpha=s)
                y.addmm_(x, w.T)
            ys.append(y)
            start += rank
        return ys, t

    @staticmethod
    def backward(dys, x, weights, lora_as, lora_bs, t, scales, dropout_p, seed, needs):
        need_x, need_w, need_b, need_a, need_lb = needs
        k, ranks = len(weights), [lb.shape[1] for lb in lora_bs]
        drop = seed is not None and dropout_p > 0.0
        inv_keep = 1.0 / (1.0 - dropout_p) if drop else 1.0
        ts = t.split(ranks, dim=1) if k > 1 else [t]
        dlbs = [
            torch.mm(ti.T, dy).mul_(s).T.contiguous() if n else None
            for dy, ti, s, n in zip(dys, ts, scales, need_lb)
        ]
        merge = not drop and x.dtype == torch.float32 and x.shape[0] >= max(w.shape[0] for w in weights)
        dlas, dx = [None] * k, None
        if any(need_a) or (need_x and not merge):
            pos = TorchLora.dropped_positions(x.numel(), dropout_p, seed, x.device) if drop else None
            # ds_i = s_i · dy_i B_i (times 1/(1-p) for the mask's scale): the gradient reaching t_i.
            dss = [torch.mm(dy, lb * (s * inv_keep)) for dy, lb, s in zip(dys, lora_bs, scales)]
            ds = dss[0] if k == 1 else torch.cat(dss, 1)
            if any(need_a):
                xd = x
                if drop:
                    xd = TorchLora._zero_at(torch.clone(x, memory_format=torch.contiguous_format), pos)
                da = torch.mm(ds.T, xd)
                del xd
                # Separate tensors per member: custom-op outputs must not alias each other.
                das = [da] if k == 1 else [g.clone() for g in da.split(ranks)]
                dlas = [g if n else None for g, n in zip(das, need_a)]
            if need_x and not merge:
                a_cat = lora_as[0] if k == 1 else torch.cat(lora_as)
                dx = torch.mm(ds, a_cat)
                if drop:
                    TorchLora._zero_at(dx, pos)
                for dy, w in zip(dys, weights):
                    dx.addmm_(dy, w)
        if need_x and merge:
            for dy, w, lora_a, lora_b, s in zip(dys, weights, lora_as, lora_bs, scales):
                w_eff = TorchLora._merged(w, lora_a, lora_b, s)
                dx = torch.mm(dy, w_eff) if dx is None else dx.addmm_(dy, w_eff)
        dws = [torch.mm(dy.T, x) if n else None for dy, n in zip(dys, need_w)]
        dbs = [dy.sum(0) if n else None for dy, n in zip(dys, need_b)]
        return dx, dws, dbs, dlas, dlbs


# The dtypes lora_linear and the ops built on it take (float64 included: the torch backend runs it, and the
# compiled and Triton backends decline it with a reason, see _dispatch.KERNEL_DTYPES).
LORA_DTYPES = C.FLOAT_DTYPES


IMPLEMENTATIONS = register(
    "lora_linear",
    {
        "triton": Backend("triton", "fastadapters.kernels.lora", triton_reasons),
        "cpu": Backend("cpu", "fastadapters.ops._cpu_lora", extension("cpu", "lora_forward")),
        "torch": Backend("torch", TorchLora, no_reasons),
    },
)
BACKENDS = IMPLEMENTATIONS  # the name this table had before (ops.BACKENDS is the tuple of backend names)


def _backend(x: Tensor) -> Backend:
    return select("lora_linear", x.device, dtype=x.dtype)


def _biases(biases, x: Tensor) -> list[Tensor]:
    # The custom op takes biases as a tensor list (an empty tensor for "no bias") so autograd can
    # return one gradient per entry; a list of optional tensors would be a single pytree leaf.
    return [x.new_empty(0) if b is None else b for b in biases]


def _empty_if_none(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _forward(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    lora_as: list[Tensor],
    lora_bs: list[Tensor],
    scales: list[float],
    dropout_p: float,
    seed: Optional[Tensor],  # noqa: UP045
) -> tuple[list[Tensor], Tensor]:
    """The selected backend's forward on x flattened to 2-D: (ys, t); biases: empty tensor = no bias."""
    seed_int = None if seed is None else int(seed)
    biases = [None if b.numel() == 0 else b for b in biases]
    x2 = x.reshape(-1, x.shape[-1])
    ys, t = _backend(x).module().forward(x2, weights, biases, lora_as, lora_bs, scales, dropout_p, seed_int)
    return [y.reshape(*x.shape[:-1], y.shape[-1]) for y in ys], t


def _fake(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed):
    rank = sum(a.shape[0] for a in lora_as)
    n = x.numel() // x.shape[-1]
    return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights], x.new_empty(n, rank)


def _backward_forward(
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
    backend: str,
) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    """Gradients (dx, dws, dbs, dlas, dlbs), empty where `needs` (flat: x, w.., b.., A.., B..) is False."""
    k = len(weights)
    split = (
        needs[0],
        needs[1 : 1 + k],
        needs[1 + k : 1 + 2 * k],
        needs[1 + 2 * k : 1 + 3 * k],
        needs[1 + 3 * k :],
    )
    x2 = x.reshape(-1, x.shape[-1])
    dys2 = [dy.reshape(-1, dy.shape[-1]) for dy in dys]
    # The backend that ran forward, whatever is forced now: only it regenerates the same dropout mask.
    dx, dws, dbs, dlas, dlbs = (
        IMPLEMENTATIONS[backend]
        .module()
        .backward(
            dys2,
            x2,
            weights,
            lora_as,
            lora_bs,
            t,
            scales,
            dropout_p,
            None if seed is None else int(seed),
            split,
        )
    )
    return (
        x.new_empty(0) if dx is None else dx.reshape(x.shape),
        [_empty_if_none(g, x) for g in dws],
        [_empty_if_none(g, x) for g in dbs],
        [_empty_if_none(g, x) for g in dlas],
        [_empty_if_none(g, x) for g in dlbs],
    )


def _backward_fake(dys, x, weights, lora_as, lora_bs, t, scales, dropout_p, seed, needs, backend):
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


def _setup(ctx, inputs, output):
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
    ctx.backend = _backend(x).name
    ctx.save_for_backward(x, output[1], *weights, *lora_as, *lora_bs, *([seed] if seed is not None else []))


def _backward(ctx, grads, run):
    k, needs = ctx.k, ctx.needs
    x, t, *rest = ctx.saved_tensors
    weights, lora_as, lora_bs = list(rest[:k]), list(rest[k : 2 * k]), list(rest[2 * k : 3 * k])
    seed = rest[3 * k] if ctx.has_seed else None
    # Upstream gradients of unused outputs arrive as None: zeros of the output's shape.
    dys = [x.new_zeros(*x.shape[:-1], w.shape[0]) if dy is None else dy for dy, w in zip(grads[0], weights)]
    dx, dws, dbs, dlas, dlbs = run(
        dys, x, weights, lora_as, lora_bs, t, ctx.scales, ctx.dropout_p, seed, needs, ctx.backend
    )

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


_AUTOGRAD = Autograd(_setup, _backward, _backward_forward, _backward_fake)
LORA_LINEAR = Op("lora_linear", _forward, _fake, tensor_lists=(1, 2, 3, 4), autograd=_AUTOGRAD)
_lora_linear_op = LORA_LINEAR.custom


def _check_member(i: int, x: Tensor, weight, bias, lora_a, lora_b, scale, grouped: bool):
    sfx = f"[{i}]" if grouped else ""
    w = C.check_tensor(f"weight{sfx}", weight, ndim=2, dtypes=LORA_DTYPES)
    C.check_like(f"weight{sfx}", w, "x", x)
    d_out, d_in = w.shape
    if d_in != x.shape[-1]:
        raise ValueError(
            f"weight{sfx} must have shape (d_out, {x.shape[-1]}) to match x, got {C.describe(w)}"
        )
    if bias is not None:
        C.check_tensor(f"bias{sfx}", bias, ndim=1, dtypes=LORA_DTYPES)
        C.check_like(f"bias{sfx}", bias, "x", x)
        C.check_shape(f"bias{sfx}", bias, (d_out,), "d_out")
    a = C.check_tensor(f"lora_a{sfx}", lora_a, ndim=2, dtypes=LORA_DTYPES)
    C.check_like(f"lora_a{sfx}", a, "x", x)
    if a.shape[0] < 1:
        raise ValueError(f"lora_a{sfx} must have rank >= 1 rows, got {C.describe(a)}")
    C.check_shape(f"lora_a{sfx}", a, (a.shape[0], d_in), "rank, d_in")
    b = C.check_tensor(f"lora_b{sfx}", lora_b, ndim=2, dtypes=LORA_DTYPES)
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
    lora_a: [r, d_in]; lora_b: [d_out, r]. All share x's dtype (fp32, fp16, bf16; fp64 on the torch
    backend only) and device.
    """
    C.check_tensor("x", x, min_ndim=1, dtypes=LORA_DTYPES)
    C.check_features("x", x)
    scale = _check_member(0, x, weight, bias, lora_a, lora_b, scale, grouped=False)
    p, seed = C.dropout_and_seed(dropout_p, training)
    return LORA_LINEAR(x, [weight], _biases([bias], x), [lora_a], [lora_b], [scale], p, seed)[0][0]


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
    C.check_tensor("x", x, min_ndim=1, dtypes=LORA_DTYPES)
    C.check_features("x", x)
    k = len(weights)
    if k == 0 or not all(len(v) == k for v in (biases, lora_as, lora_bs, scales)):
        raise ValueError(
            "weights, biases, lora_as, lora_bs and scales must be non-empty lists of one length, got "
            f"{[len(v) for v in (weights, biases, lora_as, lora_bs, scales)]}"
        )
    scales = [
        _check_member(i, x, *m, grouped=True)
        for i, m in enumerate(zip(weights, biases, lora_as, lora_bs, scales))
    ]
    p, seed = C.dropout_and_seed(dropout_p, training)
    return LORA_LINEAR(x, list(weights), _biases(biases, x), list(lora_as), list(lora_bs), scales, p, seed)[0]


def lora_dropout_mask(shape, dropout_p: float, seed: int, device, dtype=torch.float32) -> Tensor:
    """The keep mask the selected backend draws for (shape, p, seed), for tests and debugging."""
    return (
        _backend(torch.empty(0, device=device, dtype=dtype))
        .module()
        .dropout_mask(shape, dropout_p, seed, device)
    )


def lora_weight_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float) -> Tensor:
    """‖W_i + scale · (B A)_i‖ for each output row i, without forming W + scale · B A; no gradient (DoRA).

    weight: [d_out, d_in]; lora_a: [r, d_in]; lora_b: [d_out, r] -> [d_out] in weight's dtype. Expands
    ‖W_i‖² + 2s B_i·(W Aᵀ)_i + s² B_i (A Aᵀ) B_iᵀ: one [d_out, r] product with W instead of a [d_out, d_in]
    temporary, accumulated in fp32 (fp64 for fp64 weights).
    """
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        wa = (weight @ lora_a.to(weight.dtype).T).to(acc)
        a, b = lora_a.to(acc), lora_b.to(acc)
        sq = torch.linalg.vector_norm(weight, dim=1, dtype=acc).square_()
        sq.add_((b * wa).sum(1), alpha=2 * scale).add_(((b @ (a @ a.T)) * b).sum(1), alpha=scale * scale)
        return sq.clamp_(min=0).sqrt_().to(weight.dtype)


def dora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    scale: float,
) -> Tensor:
    """y = m / ‖W + scale · B A‖_row ⊙ (x Wᵀ + scale · (x Aᵀ) Bᵀ) + b: DoRA, the norm constant to autograd.

    x: [..., d_in]; weight: [d_out, d_in]; bias: [d_out] or None; lora_a: [r, d_in]; lora_b: [d_out, r];
    magnitude: [d_out]. All share x's dtype and device. The fused lora_linear op computes the directional
    part; the norm comes from lora_weight_norm (the merged weight is never formed).
    """
    C.check_tensor("x", x, min_ndim=1, dtypes=LORA_DTYPES)
    C.check_features("x", x)
    scale = _check_member(0, x, weight, bias, lora_a, lora_b, scale, grouped=False)
    C.check_tensor("magnitude", magnitude, ndim=1, dtypes=LORA_DTYPES)
    C.check_like("magnitude", magnitude, "x", x)
    C.check_shape("magnitude", magnitude, (weight.shape[0],), "d_out")
    y = LORA_LINEAR(x, [weight], _biases([None], x), [lora_a], [lora_b], [scale], 0.0, None)[0][0]
    y = y * (magnitude / lora_weight_norm(weight, lora_a, lora_b, scale))
    return y if bias is None else y + bias
