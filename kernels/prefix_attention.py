"""Triton prefix attention: flash-attention forward and backward over [prefix; keys], prefix read in place.

Each program walks the prefix blocks of its row's adapter, then the sequence blocks (up to the causal
bound), with an online softmax in base 2. The prefix is addressed through its own pointer and strides:
it is never concatenated to the keys nor copied per batch row. Backward recomputes the probabilities
from the saved row lse: one kernel gives dq; one kernel, launched twice, gives dk/dv of the sequence
keys (the GQA query heads of a group summed inside the program) and the prefix gradients, which the
programs add into fp32 buffers with atomics, so the batch reduction happens inside the kernel.

Interface: see fastadapters/ops/prefix_attention.py (forward -> (out, lse); backward -> 5 gradients).
"""

import torch
import triton
import triton.language as tl
from fastadapters.kernels import INTERPRET
from fastadapters.kernels._common import dot, dtype_flags, load_tile, pow2, store_tile, tile_offsets

# Additive masks use finfo.min for "masked"; scaled by log2(e) that overflows fp32 to -inf and would turn a
# very negative score into an excluded one, so finite biases are clamped first.
_MIN_BIAS = tl.constexpr(-1e37)
_LOG2E = tl.constexpr(1.4426950408889634)


# --------------------------------------------------------------------------------------------- helpers


@triton.jit
def _query_block(num_m_blocks, Hq, G, BLOCK_M: tl.constexpr):
    """(pid_m, pid_bh, b, h, hkv, rows) of this program's block of BLOCK_M queries of one (row, head)."""
    pid = tl.program_id(0).to(tl.int64)
    # Query blocks vary fastest, so programs running together share one head's keys in cache.
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    h = pid_bh % Hq
    return pid_m, pid_bh, pid_bh // Hq, h, h // G, pid_m * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _prefix_of(ids_ptr, b, n, PER_ROW: tl.constexpr):
    """(adapter, n or 0): the prefix batch row b reads (0 when shared); n, or 0 when it has none (id -1)."""
    if PER_ROW:
        adapter = tl.load(ids_ptr + b)
        length = tl.where(adapter >= 0, n, 0)
        a = tl.maximum(adapter, 0).to(tl.int64)
    else:
        length = n
        a = tl.zeros_like(b)
    return a, length


@triton.jit
def _sequence_end(pid_m, S, S_kv, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """The end of the sequence keys a query block sees: the causal bound of its last row, or S_kv."""
    if CAUSAL:
        hi = tl.minimum(S_kv, (pid_m + 1) * BLOCK_M + S_kv - S)
    else:
        hi = S_kv
    return hi


@triton.jit
def _scores(
    q, kt, qk_scale, rows, cols, row_ok, n_keys, b, h, off,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """s = q kᵀ · qk_scale [BLOCK_M, BLOCK_N] (log2 units), -inf where excluded: out of range, and for the
    sequence keys the causal rule and the mask (MASK_KIND 0 and CAUSAL False for the prefix)."""
    s = dot(q, kt, tl.zeros((q.shape[0], kt.shape[1]), dtype=tl.float32), IEEE) * qk_scale
    col_ok = cols < n_keys
    keep = row_ok[:, None] & col_ok[None, :]
    if CAUSAL:  # bottom-right aligned: key j visible to query i iff j <= i + S_kv - S
        keep = keep & (cols[None, :] <= rows[:, None] + off)
    if MASK_KIND == 1:  # [B, S_kv] key padding
        kept = tl.load(mask_ptr + b * stride_mb + cols * stride_mn, mask=col_ok, other=0)
        keep = keep & (kept != 0)[None, :]
    if MASK_KIND >= 2:  # a 4-D tile
        ptrs = mask_ptr + b * stride_mb + h * stride_mh + tile_offsets(rows, cols, stride_mm, stride_mn)
        tile = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0)
        if MASK_KIND == 2:  # 4-D bool, True = attend
            keep = keep & (tile != 0)
        else:  # 4-D additive
            bias = tile.to(tl.float32)
            bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, _MIN_BIAS))
            s = s + bias * _LOG2E
    return tl.where(keep, s, float("-inf"))


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, qk_scale, rows, row_ok, offs_d, b, h, off,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, hi, n_keys,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """The online softmax over keys [0, hi) of one key set (the prefix or the sequence): (acc, l_i, m_i)."""
    for start_n in range(0, hi, BLOCK_N):
        # int64 tile offsets: large tensors stay addressable, and the interpreter skips its int32 checks.
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        kt = load_tile(k_base, offs_d, cols, D, n_keys, stride_kd, stride_kn, UPCAST)
        vb = load_tile(v_base, cols, offs_d, n_keys, D, stride_vn, stride_vd, UPCAST)
        s = _scores(
            q, kt, qk_scale, rows, cols, row_ok, n_keys, b, h, off,
            mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn, MASK_KIND, CAUSAL, IEEE,
        )  # fmt: skip
        # A row that has seen only masked keys keeps m = -inf: shift by 0 so exp2 gives 0, not NaN.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(vb.dtype), vb, tl.zeros_like(acc), IEEE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta, qk_scale, rows, row_ok, offs_d, b, h, off,
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, hi, n_keys,
    mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """dq + Σ over keys [0, hi) of one key set of dS K, dS = P ⊙ (dO Vᵀ − delta), P from the saved lse."""
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        kt = load_tile(k_base, offs_d, cols, D, n_keys, stride_kd, stride_kn, UPCAST)
        vt = load_tile(v_base, offs_d, cols, D, n_keys, stride_vd, stride_vn, UPCAST)
        s = _scores(
            q, kt, qk_scale, rows, cols, row_ok, n_keys, b, h, off,
            mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn, MASK_KIND, CAUSAL, IEEE,
        )  # fmt: skip
        p = tl.math.exp2(s - lse2[:, None])
        ds = p * (dot(do, vt, tl.zeros(p.shape, dtype=tl.float32), IEEE) - delta[:, None])
        dq += dot(ds.to(kt.dtype), tl.trans(kt), tl.zeros_like(dq), IEEE)
    return dq


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _prefix_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, ids_ptr, mask_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pka, stride_pkh, stride_pkp, stride_pkd,
    stride_pva, stride_pvh, stride_pvp, stride_pvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_os, stride_od,
    Hq, S, S_kv, P, G, num_m_blocks, sm_scale,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, PER_ROW: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh, b, h, hkv, rows = _query_block(num_m_blocks, Hq, G, BLOCK_M)
    offs_d = tl.arange(0, D_PAD).to(tl.int64)  # head dims 80/96 run padded to 128
    row_ok = rows < S
    q = load_tile(q_ptr + b * stride_qb + h * stride_qh, rows, offs_d, S, D, stride_qs, stride_qd, UPCAST)
    qk_scale = sm_scale * _LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    # 1. The prefix of this row's adapter (adapter 0 when shared), visible to every query.
    a, prefix_len = _prefix_of(ids_ptr, b, P, PER_ROW)
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, qk_scale, rows, row_ok, offs_d, b, h, 0,
        pk_ptr + a * stride_pka + hkv * stride_pkh, pv_ptr + a * stride_pva + hkv * stride_pvh,
        stride_pkp, stride_pkd, stride_pvp, stride_pvd, prefix_len, P,
        mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn, 0, False, D, BLOCK_N, UPCAST, IEEE,
    )  # fmt: skip
    # 2. The sequence keys, up to the causal bound of this block's last row.
    acc, l_i, m_i = _fwd_inner(
        acc, l_i, m_i, q, qk_scale, rows, row_ok, offs_d, b, h, S_kv - S,
        k_ptr + b * stride_kb + hkv * stride_kh, v_ptr + b * stride_vb + hkv * stride_vh,
        stride_ks, stride_kd, stride_vs, stride_vd, _sequence_end(pid_m, S, S_kv, BLOCK_M, CAUSAL), S_kv,
        mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn, MASK_KIND, CAUSAL, D, BLOCK_N, UPCAST, IEEE,
    )  # fmt: skip

    # A row that saw nothing outputs 0 and stores lse = +inf, so its backward probabilities are exactly 0.
    dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    lse = tl.where(dead, float("inf"), (m_i + tl.math.log2(tl.where(dead, 1.0, l_i))) * 0.6931471805599453)
    store_tile(out_ptr + b * stride_ob + h * stride_oh, out, rows, offs_d, S, D, stride_os, stride_od)
    tl.store(lse_ptr + pid_bh * S + rows, lse, mask=row_ok)


@triton.jit
def _prefix_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, ids_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_pka, stride_pkh, stride_pkp, stride_pkd,
    stride_pva, stride_pvh, stride_pvp, stride_pvd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dqb, stride_dqh, stride_dqs, stride_dqd,
    Hq, S, S_kv, P, G, num_m_blocks, sm_scale,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, PER_ROW: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    pid_m, pid_bh, b, h, hkv, rows = _query_block(num_m_blocks, Hq, G, BLOCK_M)
    offs_d = tl.arange(0, D_PAD).to(tl.int64)
    row_ok = rows < S
    q = load_tile(q_ptr + b * stride_qb + h * stride_qh, rows, offs_d, S, D, stride_qs, stride_qd, UPCAST)
    do = load_tile(
        do_ptr + b * stride_dob + h * stride_doh, rows, offs_d, S, D, stride_dos, stride_dod, UPCAST
    )
    # Rows past S get lse = +inf: their probabilities are 0.
    lse2 = tl.load(lse_ptr + pid_bh * S + rows, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(delta_ptr + pid_bh * S + rows, mask=row_ok, other=0.0)
    qk_scale = sm_scale * _LOG2E
    dq = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    a, prefix_len = _prefix_of(ids_ptr, b, P, PER_ROW)
    dq = _dq_inner(
        dq, q, do, lse2, delta, qk_scale, rows, row_ok, offs_d, b, h, 0,
        pk_ptr + a * stride_pka + hkv * stride_pkh, pv_ptr + a * stride_pva + hkv * stride_pvh,
        stride_pkp, stride_pkd, stride_pvp, stride_pvd, prefix_len, P,
        mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn, 0, False, D, BLOCK_N, UPCAST, IEEE,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, qk_scale, rows, row_ok, offs_d, b, h, S_kv - S,
        k_ptr + b * stride_kb + hkv * stride_kh, v_ptr + b * stride_vb + hkv * stride_vh,
        stride_ks, stride_kd, stride_vs, stride_vd, _sequence_end(pid_m, S, S_kv, BLOCK_M, CAUSAL), S_kv,
        mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn, MASK_KIND, CAUSAL, D, BLOCK_N, UPCAST, IEEE,
    )  # fmt: skip
    store_tile(
        dq_ptr + b * stride_dqb + h * stride_dqh, dq * sm_scale, rows, offs_d, S, D, stride_dqs, stride_dqd
    )


@triton.jit
def _prefix_attention_bwd_kv_kernel(
    q_ptr, key_ptr, value_ptr, ids_ptr, mask_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    stride_qb, stride_qh, stride_qs, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_dob, stride_doh, stride_dos, stride_dod,
    stride_dkb, stride_dkh, stride_dks, stride_dkd,
    stride_dvb, stride_dvh, stride_dvs, stride_dvd,
    Hq, Hkv, S, N, G, num_n_blocks, sm_scale,
    IS_PREFIX: tl.constexpr, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, PER_ROW: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """dk, dv of one block of N keys for one (batch row, kv head). Sequence keys (N = S_kv): stored.
    Prefix (N = P; the key tensors' first stride steps over adapters; launched with MASK_KIND 0 and CAUSAL
    False): added atomically into fp32 [A, Hkv, P, D] buffers, summing every row that uses the adapter."""
    pid = tl.program_id(0).to(tl.int64)
    pid_n = pid % num_n_blocks
    pid_bh = pid // num_n_blocks
    b = pid_bh // Hkv
    hkv = pid_bh % Hkv
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, D_PAD).to(tl.int64)
    if IS_PREFIX:
        key_row, row_end = _prefix_of(ids_ptr, b, S, PER_ROW)
    else:
        key_row = b
        row_end = S
    kb = load_tile(
        key_ptr + key_row * stride_kb + hkv * stride_kh, cols, offs_d, N, D, stride_ks, stride_kd, UPCAST
    )
    vb = load_tile(
        value_ptr + key_row * stride_vb + hkv * stride_vh, cols, offs_d, N, D, stride_vs, stride_vd, UPCAST
    )
    qk_scale = sm_scale * _LOG2E
    dk = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], dtype=tl.float32)
    off = N - S
    row_start = 0
    if not IS_PREFIX:
        if CAUSAL:  # rows before the first one that sees this block's first key contribute nothing
            row_start = (tl.maximum(pid_n * BLOCK_N - off, 0) // BLOCK_M) * BLOCK_M
    for g in range(0, G):
        h = hkv * G + g
        bh = b * Hq + h
        q_base = q_ptr + b * stride_qb + h * stride_qh
        do_base = do_ptr + b * stride_dob + h * stride_doh
        for start_m in range(row_start, row_end, BLOCK_M):
            rows = start_m + offs_m
            row_ok = rows < S
            q = load_tile(q_base, rows, offs_d, S, D, stride_qs, stride_qd, UPCAST)
            do = load_tile(do_base, rows, offs_d, S, D, stride_dos, stride_dod, UPCAST)
            lse2 = tl.load(lse_ptr + bh * S + rows, mask=row_ok, other=float("inf")) * _LOG2E
            delta = tl.load(delta_ptr + bh * S + rows, mask=row_ok, other=0.0)
            s = _scores(
                q, tl.trans(kb), qk_scale, rows, cols, row_ok, N, b, h, off,
                mask_ptr, stride_mb, stride_mh, stride_mm, stride_mn, MASK_KIND, CAUSAL, IEEE,
            )  # fmt: skip
            p = tl.math.exp2(s - lse2[:, None])
            dv += dot(tl.trans(p).to(do.dtype), do, tl.zeros_like(dv), IEEE)
            ds = p * (dot(do, tl.trans(vb), tl.zeros_like(p), IEEE) - delta[:, None])
            dk += dot(tl.trans(ds).to(q.dtype), q, tl.zeros_like(dk), IEEE)
    dk = dk * sm_scale
    if IS_PREFIX:
        # Every batch row (and GQA group) using this adapter adds into the same prefix gradient.
        live = (cols < N)[:, None] & (offs_d < D)[None, :] & (row_end > 0)
        dk_offs = tile_offsets(cols, offs_d, stride_dks, stride_dkd)
        dv_offs = tile_offsets(cols, offs_d, stride_dvs, stride_dvd)
        tl.atomic_add(dk_ptr + key_row * stride_dkb + hkv * stride_dkh + dk_offs, dk, mask=live)
        tl.atomic_add(dv_ptr + key_row * stride_dvb + hkv * stride_dvh + dv_offs, dv, mask=live)
    else:
        store_tile(
            dk_ptr + key_row * stride_dkb + hkv * stride_dkh, dk, cols, offs_d, N, D, stride_dks, stride_dkd
        )
        store_tile(
            dv_ptr + key_row * stride_dvb + hkv * stride_dvh, dv, cols, offs_d, N, D, stride_dvs, stride_dvd
        )


def _strides4(t: torch.Tensor) -> list[int]:
    """Strides of a 4-D tensor, 0 on broadcast (size-1) dims."""
    return [0 if n == 1 else st for n, st in zip(t.shape, t.stride())]


def _mask_args(mask, mask_kind: int, like: torch.Tensor):
    """(tensor, 4 strides) the kernels read the mask through; bool masks are read as uint8."""
    if mask_kind == 0:
        return like, [0, 0, 0, 0]
    if mask_kind == 1:
        m = mask.view(torch.uint8)
        return m, [m.stride(0), 0, 0, m.stride(1)]
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    return m, _strides4(m)


def _config(D: int, kernel: str):
    """(D_PAD, BLOCK_M, BLOCK_N, num_warps, num_stages) for one kernel."""
    d_pad = pow2(D, 16)
    if INTERPRET:  # few, large programs: the interpreter's cost is per operation, not per element
        return d_pad, 64, 64, 4, 1
    if kernel == "fwd":
        return (d_pad, 128, 64, 8, 2) if d_pad <= 64 else (d_pad, 64, 64, 4, 2)
    return (d_pad, 64, 64, 4, 2) if d_pad <= 64 else (d_pad, 64, 32, 4, 2)


def forward(q, k, v, prefix_k, prefix_v, mask, mask_kind, causal, scale, prefix_ids):
    B, Hq, S, D = q.shape
    Hkv, S_kv = k.shape[1], k.shape[2]
    P = prefix_k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    m, m_strides = _mask_args(mask, mask_kind, q)
    ids = q if prefix_ids is None else prefix_ids
    d_pad, bm, bn, warps, stages = _config(D, "fwd")
    num_m = triton.cdiv(S, bm)
    _prefix_attention_fwd_kernel[(num_m * B * Hq,)](
        q, k, v, prefix_k, prefix_v, ids, m, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *m_strides,
        *out.stride(),
        Hq, S, S_kv, P, Hq // Hkv, num_m, scale,
        MASK_KIND=mask_kind, CAUSAL=causal, PER_ROW=prefix_ids is not None,
        D=D, D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **dtype_flags(q.dtype),
    )  # fmt: skip
    return out, lse


def backward(dout, q, k, v, prefix_k, prefix_v, out, lse, mask, mask_kind, causal, scale, prefix_ids, needs):
    B, Hq, S, D = q.shape
    Hkv, S_kv = k.shape[1], k.shape[2]
    A, P = prefix_k.shape[0], prefix_k.shape[2]
    G = Hq // Hkv
    need_q, need_k, need_v, need_pk, need_pv = needs
    delta = (dout.float() * out.float()).sum(-1).contiguous()  # rowsum(dO ∘ O), [B, Hq, S]
    lse = lse.contiguous()
    m, m_strides = _mask_args(mask, mask_kind, q)
    ids = q if prefix_ids is None else prefix_ids
    per_row = prefix_ids is not None
    d_pad, bm, bn, warps, stages = _config(D, "bwd")
    meta = dict(
        D=D, D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **dtype_flags(q.dtype)
    )
    dq = dk = dv = dpk = dpv = None
    if need_q:
        dq = torch.empty_like(q)
        num_m = triton.cdiv(S, bm)
        _prefix_attention_bwd_dq_kernel[(num_m * B * Hq,)](
            q, k, v, prefix_k, prefix_v, ids, m, dout, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *prefix_k.stride(), *prefix_v.stride(), *m_strides,
            *dout.stride(), *dq.stride(),
            Hq, S, S_kv, P, G, num_m, scale,
            MASK_KIND=mask_kind, CAUSAL=causal, PER_ROW=per_row, **meta,
        )  # fmt: skip
    if need_k or need_v:
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        num_n = triton.cdiv(S_kv, bn)
        _prefix_attention_bwd_kv_kernel[(num_n * B * Hkv,)](
            q, k, v, ids, m, dout, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *m_strides, *dout.stride(), *dk.stride(), *dv.stride(),
            Hq, Hkv, S, S_kv, G, num_n, scale,
            IS_PREFIX=False, MASK_KIND=mask_kind, CAUSAL=causal, PER_ROW=per_row, **meta,
        )  # fmt: skip
    if need_pk or need_pv:
        dpk32 = torch.zeros(A, Hkv, P, D, dtype=torch.float32, device=q.device)
        dpv32 = torch.zeros(A, Hkv, P, D, dtype=torch.float32, device=q.device)
        num_n = triton.cdiv(P, bn)
        _prefix_attention_bwd_kv_kernel[(num_n * B * Hkv,)](
            q, prefix_k, prefix_v, ids, m, dout, lse, delta, dpk32, dpv32,
            *q.stride(), *prefix_k.stride(), *prefix_v.stride(), *m_strides, *dout.stride(),
            *dpk32.stride(), *dpv32.stride(),
            Hq, Hkv, S, P, G, num_n, scale,
            IS_PREFIX=True, MASK_KIND=0, CAUSAL=False, PER_ROW=per_row, **meta,
        )  # fmt: skip
        dpk, dpv = dpk32.to(prefix_k.dtype), dpv32.to(prefix_v.dtype)
    return (
        dq,
        dk if need_k else None,
        dv if need_v else None,
        dpk if need_pk else None,
        dpv if need_pv else None,
    )
