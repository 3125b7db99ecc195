"""Prefix attention: softmax(scale · q [P_k; K]ᵀ + mask) [P_v; V], the prefix read in place.

One custom op, `fastadapters::prefix_attention`, returns the output and the row log-sum-exp (lse) that
backward needs; backward is a second custom op. The prefix (prefix tuning's learned keys/values) is
shared by the batch ([Hkv, P, D]) or chosen per row ([A, Hkv, P, D] with adapter_ids, -1 = none). It is
never concatenated to the keys: the Triton kernel reads it through its own pointer; the torch backend
attends to it as a separate block (on the CPU the batch flattened into one query sequence, so a shared
prefix is not copied per row either) and merges the two blocks by log-sum-exp.

Attention masks the op accepts (they cover the sequence keys only; the prefix is always visible):
    kind 0: none;
    kind 1: [B, S_kv] key padding, normalised to bool (True = keep);
    kind 2: 4-D bool [B|1, Hq|1, S, S_kv], True = attend (what transformers' sdpa mask builds);
    kind 3: 4-D float [B|1, Hq|1, S, S_kv], added to the scores (an additive mask or a bias, e.g. ALiBi).
`causal` is bottom-right aligned: key j is visible to query i iff j <= i + S_kv - S. A row that sees no
key at all (no prefix, every key masked) outputs zeros and has lse = +inf, which makes its backward zero.

Backends implement, on q [B, Hq, S, D], k/v [B, Hkv, S_kv, D], prefix [A, Hkv, P, D]:
    forward(q, k, v, prefix_k, prefix_v, mask, mask_kind, causal, scale, adapter_ids) -> (out, lse)
    backward(dout, q, k, v, prefix_k, prefix_v, out, lse, mask, mask_kind, causal, scale, adapter_ids, needs)
        -> (dq, dk, dv, dprefix_k, dprefix_v), None where `needs` (5 flags) says not needed
`mask` is None for kind 0; `adapter_ids` is None when the prefix is shared (A = 1); out is [B, Hq, S, D]
in q's dtype, lse is [B, Hq, S] float32; prefix gradients are [A, Hkv, P, D] reduced over the batch.
"""

import math
import warnings

import torch
from torch import Tensor

from fastadapters.ops import _checks as C
from fastadapters.ops._autograd import Autograd, Op
from fastadapters.ops._dispatch import Backend, no_reasons, register, select, triton_reasons

NONE, KEY_PADDING, BOOL_4D, ADDITIVE_4D = 0, 1, 2, 3

_cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_cpu_flash_backward = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def _seq_bias(q: Tensor, mask, mask_kind: int, causal: bool, S: int, S_kv: int, dtype):
    """(additive bias broadcastable to [B, Hq, S, S_kv] or None, is_causal flag for a top-left kernel,
    alive [B|1, Hq|1, S, 1] bool or None): the sequence block's mask in the form SDPA-style kernels take."""
    dev = q.device
    # A top-left causal flag equals bottom-right alignment only when S == S_kv; one query row (decode)
    # sees every key; otherwise the offset causal pattern goes into the bias.
    use_flag = causal and S == S_kv
    fold_causal = causal and S != S_kv and S > 1
    off = S_kv - S
    allowed = None  # bool pattern of the sequence keys, when there is one
    bias = None
    if mask_kind == KEY_PADDING:
        allowed = mask.view(mask.shape[0], 1, 1, S_kv)
    elif mask_kind == BOOL_4D:
        allowed = mask
    elif mask_kind == ADDITIVE_4D:
        bias = mask.to(dtype)
    if fold_causal:
        pattern = torch.arange(S_kv, device=dev).view(1, S_kv) <= torch.arange(S, device=dev).view(S, 1) + off
        allowed = pattern.view(1, 1, S, S_kv) if allowed is None else allowed & pattern
    if allowed is not None:
        fill = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(~allowed, float("-inf"))
        bias = fill if bias is None else bias + fill
    alive = None
    if bias is not None:
        if mask_kind == KEY_PADDING and not fold_causal:
            # Cheap form: row i sees a key iff some kept key lies at or before i + off.
            counts = mask.cumsum(-1)
            if use_flag:
                alive = counts[:, torch.arange(S, device=dev) + off].view(-1, 1, S, 1) > 0
            else:
                alive = counts[:, -1:].view(-1, 1, 1, 1) > 0
        else:
            visible = ~torch.isneginf(bias)
            if use_flag:
                visible = visible & torch.ones(S, S_kv, dtype=torch.bool, device=dev).tril(off)
            alive = visible.any(-1, keepdim=True)
    return bias, use_flag, alive


class _PrefixSide:
    """The prefix block as batched matmuls [X, M, D] x [X, P, D]. A shared prefix folds the batch into the
    GEMM rows (X = Hq heads, M = B·S queries): one matmul per head for the whole batch, no per-row copy,
    and the batch reduction of its gradient is the GEMM's own sum. A per-row prefix gathers each row's
    [Hkv, P, D] (X = B·Hq, M = S). GQA repeats the prefix (not the queries) per query head."""

    def __init__(self, q: Tensor, prefix_k: Tensor, prefix_v: Tensor, adapter_ids):
        B, Hq, S, D = q.shape
        A, Hkv, P, _ = prefix_k.shape
        self.B, self.Hq, self.S, self.Hkv, self.G, self.P, self.A = B, Hq, S, Hkv, Hq // Hkv, P, A
        self.ids = adapter_ids
        if adapter_ids is None:
            pk, pv = prefix_k[0], prefix_v[0]  # [Hkv, P, D]
        else:
            # Rows without a prefix gather prefix 0 (a copy) and get it zero-filled: a NaN there must not
            # reach them through 0-probability products (their scores are masked to -inf besides).
            rows, absent = adapter_ids.clamp(min=0), (adapter_ids < 0).view(B, 1, 1, 1)
            pk = prefix_k[rows].masked_fill_(absent, 0).reshape(B * Hkv, P, D)
            pv = prefix_v[rows].masked_fill_(absent, 0).reshape(B * Hkv, P, D)
        self.pk = pk.repeat_interleave(self.G, 0) if self.G > 1 else pk  # [X, P, D]
        self.pv = pv.repeat_interleave(self.G, 0) if self.G > 1 else pv

    def to_x(self, t: Tensor) -> Tensor:
        """[B, Hq, S, ...] -> [X, M, ...]; a view for transformers' [B, S, H, D] memory layout."""
        if self.ids is None:
            return t.transpose(0, 1).reshape(self.Hq, self.B * self.S, *t.shape[3:])
        return t.reshape(self.B * self.Hq, self.S, *t.shape[3:])

    def from_x(self, t: Tensor) -> Tensor:
        """[X, M, ...] -> [B, Hq, S, ...] (a view)."""
        if self.ids is None:
            return t.view(self.Hq, self.B, self.S, *t.shape[2:]).transpose(0, 1)
        return t.view(self.B, self.Hq, self.S, *t.shape[2:])

    def scores(self, q_x: Tensor, scale: float) -> Tensor:
        """[X, P, M] fp32 scores (prefix-major: the GEMM runs with P rows, several times faster on the CPU
        than with P columns), -inf for rows without a prefix."""
        scores = torch.bmm(self.pk.to(q_x.dtype), q_x.transpose(1, 2)).float().mul_(scale)
        if self.ids is not None:
            absent = (self.ids < 0).repeat_interleave(self.Hq).view(-1, 1, 1)
            scores.masked_fill_(absent, float("-inf"))
        return scores

    def reduce(self, grad_x: Tensor, like: Tensor) -> Tensor:
        """[X, P, D] per-head (per-row) prefix gradients -> [A, Hkv, P, D]: GQA groups and rows summed."""
        P, D = grad_x.shape[1], grad_x.shape[2]
        if self.ids is None:
            return grad_x.view(1, self.Hkv, self.G, P, D).sum(2).to(like.dtype)
        per_row = grad_x.view(self.B, self.Hkv, self.G, P, D).sum(2)
        grad = torch.zeros(like.shape, dtype=torch.float32, device=like.device)
        keep = self.ids >= 0
        grad.index_add_(0, self.ids[keep], per_row[keep])
        return grad.to(like.dtype)


def _flat(t: Tensor) -> Tensor:
    """[B, H, S, D] -> [1, H, B·S, D]: the batch as one long query sequence (a view for transformers'
    [B, S, H, D] memory layout)."""
    B, H, S, D = t.shape
    return t.transpose(1, 2).reshape(1, B * S, H, D).transpose(1, 2)


def _unflat(t: Tensor, B: int, S: int) -> Tensor:
    """Inverse of _flat."""
    H, D = t.shape[1], t.shape[3]
    return t.transpose(1, 2).reshape(B, S, H, D).transpose(1, 2)


class TorchPrefixAttention:
    """The portable path. The sequence block runs through torch's CPU flash kernel (plain math on other
    devices). A shared prefix on the CPU runs through the same kernel with the batch flattened into one
    query sequence ([1, H, B·S, D] against [1, Hkv, P, D]): no per-row copy, and its backward sums the
    prefix gradients over the batch inside the kernel. A per-row prefix (or another device) uses batched
    matmuls (_PrefixSide). The two blocks are combined by log-sum-exp; backward hands each kernel the
    TOTAL output and lse, so each returns its block's share of the full softmax gradient."""

    @staticmethod
    def _use_cpu_flash(q: Tensor) -> bool:
        return q.device.type == "cpu" and _cpu_flash is not None and _cpu_flash_backward is not None

    @staticmethod
    def _math_seq_scores(q, k, bias, use_flag, scale):
        B, Hq, S, D = q.shape
        Hkv, S_kv = k.shape[1], k.shape[2]
        G = Hq // Hkv
        scores = torch.matmul(q.reshape(B, Hkv, G * S, D).float(), k.float().transpose(-1, -2)).mul_(scale)
        scores = scores.reshape(B, Hkv, G, S, S_kv)
        if bias is not None:
            b = bias.float()
            heads = (1, 1) if b.shape[1] == 1 else (Hkv, G)
            scores = scores + b.reshape(b.shape[0], *heads, S, S_kv)
        if use_flag:
            keep = torch.ones(S, S_kv, dtype=torch.bool, device=q.device).tril(S_kv - S)
            scores = scores.masked_fill(~keep, float("-inf"))
        return scores  # [B, Hkv, G, S, S_kv]

    @staticmethod
    def forward(q, k, v, prefix_k, prefix_v, mask, mask_kind, causal, scale, adapter_ids):
        B, Hq, S, D = q.shape
        Hkv, S_kv = k.shape[1], k.shape[2]
        G = Hq // Hkv
        f32 = _as_float
        bias, use_flag, alive = _seq_bias(q, mask, mask_kind, causal, S, S_kv, q.dtype)
        cpu_flash = TorchPrefixAttention._use_cpu_flash(q)
        if cpu_flash:
            out_s, lse_s = _cpu_flash(q, k, v, 0.0, use_flag, attn_mask=bias, scale=scale)
        else:
            scores = TorchPrefixAttention._math_seq_scores(q, k, bias, use_flag, scale)
            lse_s = torch.logsumexp(scores, -1)
            probs = torch.exp(scores - torch.where(torch.isneginf(lse_s), 0.0, lse_s).unsqueeze(-1))
            out_s = torch.matmul(probs.reshape(B, Hkv, G * S, S_kv), v.float()).reshape(B, Hq, S, D)
            lse_s = lse_s.reshape(B, Hq, S)
        if alive is not None:  # rows that see no sequence key (the CPU kernel reports lse 0 for them)
            lse_s = lse_s.masked_fill(~alive.squeeze(-1), float("-inf"))
        # Rows that see nothing get lse = +inf: every probability exp(s - lse) is then exactly 0. Rows
        # that see no sequence key have weight exp(lse_s - lse) = 0 on out_s (which is 0 there).
        if cpu_flash and adapter_ids is None:
            out_p, lse_p = _cpu_flash(_flat(q), prefix_k, prefix_v, 0.0, False, scale=scale)
            lse_p = lse_p[0].transpose(0, 1).reshape(B, S, Hq).transpose(1, 2)
            lse = torch.logaddexp(lse_s, lse_p)
            lse = torch.where(torch.isneginf(lse), float("inf"), lse)
            # The CPU kernel gives a NaN query row output 0 and lse 0; the reference (and the other paths)
            # give NaN. One sum over q (O(S·D), against the kernels' O(S·(S_kv + P)·D)) finds those rows.
            lse = lse.masked_fill(q.sum(-1, dtype=torch.float32).isnan(), float("nan"))
            out = f32(out_s) * torch.exp(lse_s - lse).unsqueeze(-1)
            out.addcmul_(f32(_unflat(out_p, B, S)), torch.exp(lse_p - lse).unsqueeze(-1))
            return out.to(q.dtype), lse
        side = _PrefixSide(q, prefix_k, prefix_v, adapter_ids)
        scores_p = side.scores(side.to_x(q), scale)  # [X, P, M]
        lse = torch.logaddexp(lse_s, side.from_x(torch.logsumexp(scores_p, 1)))
        lse = torch.where(torch.isneginf(lse), float("inf"), lse)
        probs_p = torch.exp(scores_p - side.to_x(lse).unsqueeze(1))
        # out = w_s · out_s + probs_pᵀ P_v, the second term added in place (in out_s's own layout).
        out = f32(out_s) * torch.exp(lse_s - lse).unsqueeze(-1)
        out_x = side.to_x(out)
        out_x.baddbmm_(probs_p.transpose(1, 2), f32(side.pv))
        if out_x.data_ptr() != out.data_ptr():  # to_x had to copy (q not in transformers' layout)
            out = side.from_x(out_x)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(
        dout, q, k, v, prefix_k, prefix_v, out, lse, mask, mask_kind, causal, scale, adapter_ids, needs
    ):
        B, Hq, S, D = q.shape
        Hkv, S_kv = k.shape[1], k.shape[2]
        G = Hq // Hkv
        need_q, need_k, need_v, need_pk, need_pv = needs
        f32 = _as_float
        bias, use_flag, _ = _seq_bias(q, mask, mask_kind, causal, S, S_kv, q.dtype)
        cpu_flash = TorchPrefixAttention._use_cpu_flash(q)
        dq = dk = dv = dpk = dpv = None
        delta = (
            None if cpu_flash and adapter_ids is None else (f32(dout) * f32(out)).sum(-1)
        )  # rowsum(dO ∘ O)
        if need_q or need_k or need_v:
            if cpu_flash:
                dq, dk, dv = _cpu_flash_backward(
                    dout, q, k, v, out, lse, 0.0, use_flag, attn_mask=bias, scale=scale
                )
                dq = f32(dq)
            else:
                scores = TorchPrefixAttention._math_seq_scores(q, k, bias, use_flag, scale)
                probs = torch.exp(scores - lse.reshape(B, Hkv, G, S, 1)).reshape(B, Hkv, G * S, S_kv)
                do_g = dout.reshape(B, Hkv, G * S, D).float()
                dv = torch.matmul(probs.transpose(-1, -2), do_g)
                dp = torch.matmul(do_g, v.float().transpose(-1, -2))
                ds = probs * (dp - delta.reshape(B, Hkv, G * S, 1))
                dq = torch.matmul(ds, k.float()).mul_(scale).reshape(B, Hq, S, D)
                dk = torch.matmul(ds.transpose(-1, -2), q.reshape(B, Hkv, G * S, D).float()).mul_(scale)
        if cpu_flash and adapter_ids is None:
            if need_q or need_pk or need_pv:
                lse_flat = lse.transpose(0, 1).reshape(1, Hq, B * S)
                dq_p, dpk, dpv = _cpu_flash_backward(
                    _flat(dout), _flat(q), prefix_k, prefix_v, _flat(out), lse_flat, 0.0, False, scale=scale
                )
                if need_q:
                    dq = dq.add_(_unflat(dq_p, B, S))
        else:
            side = _PrefixSide(q, prefix_k, prefix_v, adapter_ids)
            q_x, do_x = side.to_x(q), side.to_x(dout)
            probs_p = torch.exp(side.scores(q_x, scale) - side.to_x(lse).unsqueeze(1))  # [X, P, M]
            dp = torch.bmm(side.pv.to(do_x.dtype), do_x.transpose(1, 2)).float()
            ds = probs_p * dp.sub_(side.to_x(delta).unsqueeze(1))
            if need_q:
                dq_x = side.to_x(dq)
                dq_x.baddbmm_(ds.transpose(1, 2), f32(side.pk), alpha=scale)
                if dq_x.data_ptr() != dq.data_ptr():
                    dq = side.from_x(dq_x)
            if need_pk:
                dpk = side.reduce(torch.bmm(ds, f32(q_x)).mul_(scale), prefix_k)
            if need_pv:
                dpv = side.reduce(torch.bmm(probs_p, f32(do_x)), prefix_v)
        return (
            dq.to(q.dtype) if need_q else None,
            dk.to(k.dtype) if need_k else None,
            dv.to(v.dtype) if need_v else None,
            dpk.to(prefix_k.dtype) if need_pk else None,
            dpv.to(prefix_v.dtype) if need_pv else None,
        )


def _as_float(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


MAX_TRITON_HEAD_DIM = 256


def _triton_reasons(device, head_dim=None, **info) -> list[str]:
    why = triton_reasons(device, **info)
    if head_dim is not None and head_dim > MAX_TRITON_HEAD_DIM:
        why.append(f"head_dim {head_dim} > {MAX_TRITON_HEAD_DIM}")
    return why


IMPLEMENTATIONS = register(
    "prefix_attention",
    {
        "triton": Backend("triton", "fastadapters.kernels.prefix_attention", _triton_reasons),
        "torch": Backend("torch", TorchPrefixAttention, no_reasons),
    },
)
BACKENDS = IMPLEMENTATIONS  # the name this table had before (ops.BACKENDS is the tuple of backend names)


def _backend(q: Tensor) -> Backend:
    return select("prefix_attention", q.device, dtype=q.dtype, head_dim=q.shape[-1])


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """t in the memory layout of torch.empty_like(ref) (what the fake implementations promise). For q in
    transformers' [B, S, H, D] layout the output keeps it, so transformers' transpose-reshape is free."""
    target = torch.empty_like(ref)
    if t.stride() == target.stride():
        return t
    return target.copy_(t)


def _none_if_empty(t: Tensor):
    return None if t.numel() == 0 and t.dim() == 1 else t


def _as4(prefix: Tensor) -> Tensor:
    return prefix if prefix.dim() == 4 else prefix.unsqueeze(0)


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    mask: Tensor,
    mask_kind: int,
    causal: bool,
    scale: float,
    adapter_ids: Tensor,
) -> tuple[Tensor, Tensor]:
    """The selected backend's (out, lse); mask empty for kind 0, adapter_ids empty for a shared prefix."""
    mask_t = None if mask_kind == NONE else mask
    ids = _none_if_empty(adapter_ids)
    out, lse = (
        _backend(q)
        .module()
        .forward(q, k, v, _as4(prefix_k), _as4(prefix_v), mask_t, mask_kind, causal, scale, ids)
    )
    return _like(out, q), lse.contiguous()


def _fake(q, k, v, prefix_k, prefix_v, mask, mask_kind, causal, scale, adapter_ids):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


def _backward_forward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor,
    mask_kind: int,
    causal: bool,
    scale: float,
    adapter_ids: Tensor,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, dprefix_k, dprefix_v), empty where `needs` is False."""
    mask_t = None if mask_kind == NONE else mask
    ids = _none_if_empty(adapter_ids)
    grads = (
        _backend(q)
        .module()
        .backward(
            dout, q, k, v, _as4(prefix_k), _as4(prefix_v), out, lse, mask_t, mask_kind, causal, scale, ids,
            tuple(needs),
        )
    )  # fmt: skip
    refs = (q, k, v, prefix_k, prefix_v)
    return tuple(
        ref.new_empty(0) if g is None else _like(g.reshape(ref.shape), ref) for g, ref in zip(grads, refs)
    )


def _backward_fake(dout, q, k, v, prefix_k, prefix_v, out, lse, mask, mask_kind, causal, scale, ids, needs):
    refs = (q, k, v, prefix_k, prefix_v)
    return tuple(torch.empty_like(ref) if n else ref.new_empty(0) for n, ref in zip(needs, refs))


def _setup(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, mask, mask_kind, causal, scale, adapter_ids = inputs
    ctx.needs = [t.requires_grad for t in (q, k, v, prefix_k, prefix_v)]
    ctx.mask_kind, ctx.causal, ctx.scale = mask_kind, causal, scale
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, output[0], output[1], mask, adapter_ids)


def _backward(ctx, grads, run):
    q, k, v, prefix_k, prefix_v, out, lse, mask, adapter_ids = ctx.saved_tensors
    dout = torch.zeros_like(out) if grads[0] is None else grads[0]  # the lse output gets no gradient
    grads = run(
        dout, q, k, v, prefix_k, prefix_v, out, lse, mask, ctx.mask_kind, ctx.causal, ctx.scale, adapter_ids,
        ctx.needs,
    )  # fmt: skip
    return (*[g if n else None for g, n in zip(grads, ctx.needs)], None, None, None, None, None)


_AUTOGRAD = Autograd(_setup, _backward, _backward_forward, _backward_fake)
PREFIX_ATTENTION = Op("prefix_attention", _forward, _fake, autograd=_AUTOGRAD)
_prefix_attention_op = PREFIX_ATTENTION.custom


def _normalise_mask(attention_mask, q: Tensor, S_kv: int) -> tuple[Tensor, int]:
    """(mask tensor, kind) from the accepted forms; see the module docstring."""
    B, Hq, S, _ = q.shape
    if attention_mask is None:
        return q.new_empty(0), NONE
    m = attention_mask
    if not isinstance(m, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(m).__name__}")
    if m.device != q.device:
        raise ValueError(f"attention_mask must be on q's device {q.device}, got {C.describe(m)}")
    if m.dim() == 2:
        if tuple(m.shape) != (B, S_kv):
            raise ValueError(
                f"attention_mask (key padding) must have shape {(B, S_kv)} (batch, key length S_kv), "
                f"got {C.describe(m)}"
            )
        return (m if m.dtype == torch.bool else m != 0).contiguous(), KEY_PADDING
    if m.dim() == 4:
        ok = m.shape[0] in (1, B) and m.shape[1] in (1, Hq) and tuple(m.shape[2:]) == (S, S_kv)
        if not ok:
            raise ValueError(
                f"attention_mask (4-D) must have shape ({B} or 1, {Hq} or 1, {S}, {S_kv}) "
                f"(batch, query heads, query length S, key length S_kv), got {C.describe(m)}"
            )
        if m.dtype == torch.bool:
            return m, BOOL_4D
        if m.dtype in C.FLOAT_DTYPES:
            return m, ADDITIVE_4D
        raise TypeError(
            f"a 4-D attention_mask must be bool (True = attend) or float (additive), got {C.describe(m)}"
        )
    raise ValueError(
        f"attention_mask must be [B, S_kv] key padding or a 4-D [B|1, Hq|1, S, S_kv] mask, "
        f"got {C.describe(m)}"
    )


def _check_adapter_ids(name: str, ids, prefix_k: Tensor, B: int, q: Tensor) -> Tensor:
    """The per-row prefix choice as int64 [B] (empty for a shared prefix); `name`: the argument as passed."""
    if prefix_k.dim() == 3:
        if ids is not None:
            raise ValueError(
                f"{name} must be None when prefix_k is shared [Hkv, P, D], "
                f"got prefix_k {C.describe(prefix_k)}"
            )
        return q.new_empty(0, dtype=torch.int64)
    if ids is None:
        raise ValueError(
            f"prefix_k of shape {tuple(prefix_k.shape)} is per-adapter [A, Hkv, P, D]: pass {name} [B]"
        )
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor, got {ids!r:.80}")
    if ids.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {C.describe(ids)}")
    C.check_shape(name, ids, (B,), "batch")
    A = prefix_k.shape[0]
    if B > 0:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < -1 or hi >= A:
            raise ValueError(
                f"{name} must lie in [-1, {A}) (A = {A} prefixes, -1 = none), got values in [{lo}, {hi}]"
            )
    return ids.to(torch.int64).contiguous()


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Tensor,
    prefix_v: Tensor,
    attention_mask: Tensor | None = None,
    causal: bool = True,
    scale: float | None = None,
    adapter_ids: Tensor | None = None,
    *,
    prefix_ids: Tensor | None = None,
) -> Tensor:
    """out = softmax(scale · q [P_k; K]ᵀ + mask) [P_v; V]: attention over a learned prefix, then the keys.

    q: [B, Hq, S, D]; k, v: [B, Hkv, S_kv, D] (Hq % Hkv == 0; S_kv >= S when causal, e.g. with a cache);
    prefix_k, prefix_v: [Hkv, P, D] shared, or [A, Hkv, P, D] with adapter_ids: [B] int (-1 = no prefix;
    `prefix_ids`, its old name, still works and warns);
    attention_mask (sequence keys only): None, [B, S_kv] key padding (nonzero/True = keep), 4-D bool
    [B|1, Hq|1, S, S_kv] (True = attend) or 4-D float (added to the scores). The prefix is always visible;
    causal is bottom-right aligned. scale defaults to 1/sqrt(D). Returns [B, Hq, S, D] in q's dtype.
    """
    C.check_tensor("q", q, ndim=4)
    B, Hq, S, D = q.shape
    for name, t in (("k", k), ("v", v)):
        C.check_tensor(name, t, ndim=4)
        C.check_like(name, t, "q", q)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got k {C.describe(k)} and v {C.describe(v)}")
    Hkv, S_kv = k.shape[1], k.shape[2]
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(
            f"k must have shape ({B}, Hkv, S_kv, {D}) to match q {tuple(q.shape)}, got {C.describe(k)}"
        )
    if Hkv < 1 or Hq % Hkv != 0:
        raise ValueError(f"q's {Hq} heads must be a multiple of k's {Hkv} heads (grouped-query attention)")
    if S_kv < 1:
        raise ValueError(f"k must hold at least one key (S_kv >= 1), got {C.describe(k)}")
    if causal and S_kv < S:
        raise ValueError(
            f"causal attention needs S_kv >= S (keys include the queries), got S={S}, S_kv={S_kv}"
        )
    for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
        C.check_tensor(name, t)
        C.check_like(name, t, "q", q)
        if t.dim() not in (3, 4):
            raise ValueError(f"{name} must be [Hkv, P, D] or [A, Hkv, P, D], got {C.describe(t)}")
    if prefix_k.shape != prefix_v.shape:
        raise ValueError(
            f"prefix_k and prefix_v must have one shape, got {C.describe(prefix_k)} "
            f"and {C.describe(prefix_v)}"
        )
    ph, pp, pd = prefix_k.shape[-3:]
    if ph != Hkv or pd != D:
        raise ValueError(
            f"prefix_k must have {Hkv} key/value heads and head_dim {D} to match k, "
            f"i.e. [.., {Hkv}, P, {D}], "
            f"got {C.describe(prefix_k)}"
        )
    if pp < 1 or (prefix_k.dim() == 4 and prefix_k.shape[0] < 1):
        raise ValueError(f"prefix_k must hold at least one prefix token (P >= 1), got {C.describe(prefix_k)}")
    ids_name = "adapter_ids"
    if prefix_ids is not None:
        if adapter_ids is not None:
            raise TypeError("pass adapter_ids or its deprecated alias prefix_ids, not both")
        warnings.warn("prefix_attention(prefix_ids=) is deprecated; pass adapter_ids=", DeprecationWarning, 2)
        adapter_ids, ids_name = prefix_ids, "prefix_ids"
    ids = _check_adapter_ids(ids_name, adapter_ids, prefix_k, B, q)
    mask, kind = _normalise_mask(attention_mask, q, S_kv)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    scale = C.check_scale("scale", scale)
    if q.numel() == 0:
        return q.new_zeros(q.shape) + 0 * (k.sum() + v.sum() + prefix_k.sum() + prefix_v.sum())
    return PREFIX_ATTENTION(q, k, v, prefix_k, prefix_v, mask, kind, bool(causal), scale, ids)[0]
