"""Triton backend of the LoRA linear op: y = x Wᵀ + b + scale · (drop(x) Aᵀ) Bᵀ, and its grouped form.

Implements the interface documented in fastadapters/ops/lora.py (`forward`, `backward`, `dropout_mask`) on
2-D, possibly strided inputs. Three kernels do the work:
- `_lora_shrink_kernel`: out = scale · drop(x) Mᵀ for a short M. Forward: t = drop(x) [A_1; …; A_k]ᵀ/(1-p),
  x read once for every member. Backward: ds_i = s_i · dy_i B_i.
- `_lora_gemm_kernel`: out = EPI(low @ up) + Σ_j in_j @ w_j (+ bias), one fp32 accumulator. Forward: the
  base GEMM with the expand s·t_i B_iᵀ as extra K columns (EPI = ×s). Backward: dx = keep ⊙ (ds A)/(1-p)
  + Σ_i dy_i W_i, the mask applied to the low-rank K range only (EPI = ×keep/(1-p)), before the base range
  is accumulated on top.
- `_lora_reduce_kernel`: out = scale · lhsᵀ drop(rhs), a reduction over the tokens (dA, dB, dW), split over
  the tokens on a GPU when the output has too few tiles to fill it.
The dropout mask is never stored: keep = tl.rand(seed, element index in x) >= p, the same call everywhere
(`dropout_mask` included), so backward regenerates exactly the forward mask.
"""

import functools
import math

import torch
import triton
import triton.language as tl
from fastadapters.kernels import INTERPRET
from fastadapters.kernels._common import (
    dtype_flags,
    interp_block,
    keep,
    keep_2d,
    launch,
    load_tile,
    mm_loop,
    mm_loop_dropout,
    pow2,
    store_tile,
    wide,
)

# Grouped dx takes this many (dy_i, W_i) pairs per launch; more members chain launches that accumulate.
_MAX_MAIN = 3


# --------------------------------------------------------------------------------------------- kernels


@triton.jit(do_not_specialize=["seed"])
def _lora_shrink_kernel(
    x_ptr, mat_ptr, out_ptr, T, K, R,
    stride_xt, stride_xk, stride_mr, stride_mk, stride_ot, stride_or,
    scale, dropout_p, seed, T_BUCKET,
    HAS_DROPOUT: tl.constexpr, WIDE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out[T, R] = scale · drop(x)[T, K] · mat[R, K]ᵀ; a tile of tokens reads its x rows once per BLOCK_R."""
    pid_t = tl.program_id(0).to(tl.int64)
    pid_r = tl.program_id(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    acc = mm_loop_dropout(
        acc, x_ptr, mat_ptr, offs_t, offs_r, T, R, 0, K, stride_xt, stride_xk, stride_mk, stride_mr,
        seed, dropout_p, HAS_DROPOUT, False, WIDE, BLOCK_K, UPCAST, IEEE,
    )  # fmt: skip
    store_tile(out_ptr, acc * scale, offs_t, offs_r, T, R, stride_ot, stride_or)


@triton.jit(do_not_specialize=["seed"])
def _lora_gemm_kernel(
    out_ptr, low_ptr, up_ptr, bias_ptr,
    in0_ptr, w0_ptr, in1_ptr, w1_ptr, in2_ptr, w2_ptr,
    M, N, K_LOW, K0, K1, K2,
    stride_om, stride_on, stride_lm, stride_lk, stride_uk, stride_un,
    stride_i0m, stride_i0k, stride_w0k, stride_w0n,
    stride_i1m, stride_i1k, stride_w1k, stride_w1n,
    stride_i2m, stride_i2k, stride_w2k, stride_w2n,
    low_scale, dropout_p, seed, M_BUCKET, K_MAIN,
    HAS_LOW: tl.constexpr, NUM_MAIN: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    ACCUMULATE: tl.constexpr, WIDE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_K_LOW: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[M, N] = EPI(low[M, K_LOW] @ up[K_LOW, N]) + Σ_j in_j[M, K_j] @ w_j[K_j, N] (+ bias[N]) (+ out).

    EPI multiplies by low_scale and, with HAS_DROPOUT, zeroes the elements the dropout mask drops (the
    element index is m·N + n: dx has x's shape). It runs before the main K ranges are accumulated, so
    one accumulator holds both and the mask touches only the low-rank part.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M row tiles share their column tiles of w in L2.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_m = min(num_m - first_m, GROUP_M)
    pid_m = (first_m + (pid % width) % group_m).to(tl.int64)
    pid_n = ((pid % width) // group_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_LOW:
        acc = mm_loop(
            acc, low_ptr, up_ptr, offs_m, offs_n, M, N, K_LOW,
            stride_lm, stride_lk, stride_uk, stride_un, BLOCK_K_LOW, UPCAST, IEEE,
        )  # fmt: skip
        acc = acc * low_scale
        if HAS_DROPOUT:
            acc = tl.where(keep_2d(seed, offs_m, offs_n, N, dropout_p, WIDE), acc, 0.0)
    acc = mm_loop(
        acc, in0_ptr, w0_ptr, offs_m, offs_n, M, N, K0,
        stride_i0m, stride_i0k, stride_w0k, stride_w0n, BLOCK_K, UPCAST, IEEE,
    )  # fmt: skip
    if NUM_MAIN > 1:
        acc = mm_loop(
            acc, in1_ptr, w1_ptr, offs_m, offs_n, M, N, K1,
            stride_i1m, stride_i1k, stride_w1k, stride_w1n, BLOCK_K, UPCAST, IEEE,
        )  # fmt: skip
    if NUM_MAIN > 2:
        acc = mm_loop(
            acc, in2_ptr, w2_ptr, offs_m, offs_n, M, N, K2,
            stride_i2m, stride_i2k, stride_w2k, stride_w2n, BLOCK_K, UPCAST, IEEE,
        )  # fmt: skip

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if ACCUMULATE:
        acc += load_tile(out_ptr, offs_m, offs_n, M, N, stride_om, stride_on, True)
    store_tile(out_ptr, acc, offs_m, offs_n, M, N, stride_om, stride_on)


@triton.jit(do_not_specialize=["seed"])
def _lora_reduce_kernel(
    out_ptr, lhs_ptr, rhs_ptr, T, M, N,
    stride_lt, stride_lm, stride_rt, stride_rn, stride_os, stride_om, stride_on,
    scale, dropout_p, seed, T_PER_SPLIT, T_BUCKET,
    HAS_DROPOUT: tl.constexpr, WIDE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """out[split, M, N] = scale · Σ_{t in split} lhs[t, M]ᵀ drop(rhs)[t, N]; drop indexes rhs as t·N + n."""
    pid = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    num_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // num_n).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % num_n).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    t_start = split * T_PER_SPLIT
    t_end = tl.minimum(T, t_start + T_PER_SPLIT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = mm_loop_dropout(
        acc, lhs_ptr, rhs_ptr, offs_m, offs_n, M, N, t_start, t_end,
        stride_lm, stride_lt, stride_rt, stride_rn,
        seed, dropout_p, False, HAS_DROPOUT, WIDE, BLOCK_T, UPCAST, IEEE,
    )  # fmt: skip
    store_tile(out_ptr + split * stride_os, acc * scale, offs_m, offs_n, M, N, stride_om, stride_on)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(out_ptr, numel, dropout_p, seed, WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = keep(seed, i): the mask the other kernels draw, materialised (for tests and debugging)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    kept = keep(seed, offs, dropout_p, WIDE)
    tl.store(out_ptr + offs, kept.to(tl.uint8), mask=offs < numel)


# --------------------------------------------------------------------------------------------- autotune
# On a GPU each kernel picks among a few configs (FASTADAPTERS_AUTOTUNE=0 takes the first one untimed, which
# keeps test runs over many small shapes quick). The interpreter cannot time configs and is slow with small
# blocks, so it runs the raw kernel with large blocks sized to the problem.

_SHRINK_CONFIGS = [
    triton.Config({"BLOCK_T": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_T": 32, "BLOCK_K": 128}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_T": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_T": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
]
_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
]
_REDUCE_CONFIGS = [
    triton.Config({"BLOCK_T": 64}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_T": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_T": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_T": 128}, num_warps=8, num_stages=3),
]

_shrink_tuned = triton.autotune(_SHRINK_CONFIGS, key=["T_BUCKET", "K", "R"])(_lora_shrink_kernel)
# ACCUMULATE launches read `out`: timing them must not add into it again.
_gemm_tuned = triton.autotune(
    _GEMM_CONFIGS, key=["M_BUCKET", "N", "K_MAIN", "K_LOW"], restore_value=["out_ptr"]
)(_lora_gemm_kernel)
_reduce_tuned = triton.autotune(_REDUCE_CONFIGS, key=["T_BUCKET", "M", "N"])(_lora_reduce_kernel)


@functools.cache
def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


# --------------------------------------------------------------------------------------------- launchers


def _shrink(out, x, mat, scale, dropout_p=0.0, seed=None):
    """out[T, R] = scale · drop(x)[T, K] matᵀ, mat [R, K]; dropout when seed is not None."""
    T, K = x.shape
    R = mat.shape[0]
    if out.numel() == 0:
        return
    seed_arg = 0 if seed is None else int(seed)
    strides = (x.stride(0), x.stride(1), mat.stride(0), mat.stride(1), out.stride(0), out.stride(1))
    scalars = (float(scale), float(dropout_p), seed_arg, triton.next_power_of_2(T))
    args = (x, mat, out, T, K, R, *strides, *scalars)
    meta = dict(
        HAS_DROPOUT=seed is not None, WIDE=wide(x.numel()), BLOCK_R=pow2(R, 16, 128), **dtype_flags(x.dtype)
    )
    n_r = triton.cdiv(R, meta["BLOCK_R"])
    grid = lambda m: (triton.cdiv(T, m["BLOCK_T"]), n_r)
    interp = dict(BLOCK_T=interp_block(T), BLOCK_K=interp_block(K))
    launch(_shrink_tuned, grid, args, meta, interp)


def _gemm(
    out, mains, low=None, up=None, low_scale=1.0, bias=None, dropout_p=0.0, seed=None, accumulate=False
):
    """out[M, N] = EPI(low @ up) + Σ in_j @ w_j + bias (+ out); mains = [(in_j [M, K_j], w_j [K_j, N])]."""
    M, N = out.shape
    if out.numel() == 0:
        return
    assert 1 <= len(mains) <= _MAX_MAIN
    padded = list(mains) + [mains[0]] * (_MAX_MAIN - len(mains))
    has_low = low is not None
    if not has_low:
        low, up = mains[0]
    main_args, main_strides = [], []
    for inp, w in padded:
        main_args += [inp, w]
        main_strides += [inp.stride(0), inp.stride(1), w.stride(0), w.stride(1)]
    ks = [inp.shape[1] for inp, _ in padded]
    k_low = low.shape[1] if has_low else 0
    args = (
        out, low, up, out if bias is None else bias, *main_args, M, N, k_low, *ks,
        out.stride(0), out.stride(1), low.stride(0), low.stride(1), up.stride(0), up.stride(1), *main_strides,
        float(low_scale), float(dropout_p), 0 if seed is None else int(seed), triton.next_power_of_2(M),
        sum(inp.shape[1] for inp, _ in mains),
    )  # fmt: skip
    meta = dict(
        HAS_LOW=has_low,
        NUM_MAIN=len(mains),
        HAS_BIAS=bias is not None,
        HAS_DROPOUT=has_low and seed is not None,
        ACCUMULATE=accumulate,
        WIDE=wide(out.numel()),
        BLOCK_K_LOW=pow2(k_low, 16, 64),
        **dtype_flags(out.dtype),
    )
    grid = lambda m: (triton.cdiv(M, m["BLOCK_M"]) * triton.cdiv(N, m["BLOCK_N"]),)
    interp = dict(BLOCK_M=interp_block(M), BLOCK_N=interp_block(N), BLOCK_K=interp_block(max(ks)), GROUP_M=8)
    launch(_gemm_tuned, grid, args, meta, interp)


def _reduce(out, lhs, rhs, scale, dropout_p=0.0, seed=None):
    """out[M, N] = scale · lhs[T, M]ᵀ drop(rhs)[T, N]; dropout on rhs (indexed t·N + n) when seed is given."""
    T, M = lhs.shape
    N = rhs.shape[1]
    if out.numel() == 0:
        return
    if T == 0:
        out.zero_()
        return
    block_m, block_n = pow2(M, 16, 128), pow2(N, 16, 128)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    splits = 1
    if not INTERPRET and out.is_cuda:
        # Small outputs (dA, dB: rank rows) have too few tiles for the GPU: split the tokens, sum after.
        sms = _num_sms(out.device)
        if tiles < sms:
            splits = max(1, min(2 * sms // tiles, triton.cdiv(T, 512)))
    per_split = triton.cdiv(T, splits)
    dest = out if splits == 1 else torch.empty(splits, M, N, device=out.device, dtype=torch.float32)
    stride_s = 0 if splits == 1 else dest.stride(0)
    stride_m, stride_n = dest.stride(-2), dest.stride(-1)
    strides = (lhs.stride(0), lhs.stride(1), rhs.stride(0), rhs.stride(1), stride_s, stride_m, stride_n)
    seed_arg = 0 if seed is None else int(seed)
    args = (dest, lhs, rhs, T, M, N, *strides, float(scale), float(dropout_p), seed_arg, per_split)
    args += (triton.next_power_of_2(T),)
    meta = dict(
        HAS_DROPOUT=seed is not None,
        WIDE=wide(T * N),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        **dtype_flags(lhs.dtype),
    )
    interp = dict(BLOCK_T=interp_block(T))
    launch(_reduce_tuned, (tiles, splits), args, meta, interp)
    if splits > 1:
        out.copy_(dest.sum(0))


def _dropout_seed(dropout_p: float, seed):
    """The seed when dropout is active, else None (the kernels then skip the mask)."""
    return None if seed is None or dropout_p == 0.0 else int(seed)


def _cat(tensors):
    # A single member needs no copy; several are stacked once (a small [Σ r, d_in] copy) for one launch.
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


# --------------------------------------------------------------------------------------------- interface


def forward(x, weights, biases, lora_as, lora_bs, scales, dropout_p, seed):
    """ys[i] = x W_iᵀ + b_i + s_i · t_i B_iᵀ with t = drop(x) [A_1; …]ᵀ; returns (ys, t).

    x: [N, d_in] (any strides); weights[i]: [d_out_i, d_in] (any strides); biases[i]: [d_out_i] or None;
    lora_as[i]: [r_i, d_in]; lora_bs[i]: [d_out_i, r_i]; t: [N, Σ r_i] in x's dtype.
    """
    T, _ = x.shape
    ranks = [a.shape[0] for a in lora_as]
    t = x.new_empty(T, sum(ranks))
    ys = [x.new_empty(T, w.shape[0]) for w in weights]
    if T == 0:
        return ys, t
    seed = _dropout_seed(dropout_p, seed)
    keep_scale = 1.0 if seed is None else 1.0 / (1.0 - dropout_p)
    # The 1/(1-p) of inverted dropout is linear: apply it to the fp32 accumulator, not to every x element.
    _shrink(t, x, _cat(lora_as), keep_scale, dropout_p, seed)
    start = 0
    for y, w, b, lora_b, s, r in zip(ys, weights, biases, lora_bs, scales, ranks):
        _gemm(y, [(x, w.T)], low=t[:, start : start + r], up=lora_b.T, low_scale=s, bias=b)
        start += r
    return ys, t


def backward(dys, x, weights, lora_as, lora_bs, t, scales, dropout_p, seed, needs):
    """Gradients of `forward`: (dx, dweights, dbiases, dlora_as, dlora_bs), None where `needs` says so.

    dys[i]: [N, d_out_i] (any strides); t: forward's [N, Σ r_i]; needs = (x, [W_i], [b_i], [A_i], [B_i]).
    ds_i = s_i dy_i B_i; dB_i = s_i dy_iᵀ t_i; dA = dsᵀ drop(x); dx = Σ dy_i W_i + keep ⊙ (ds A)/(1-p).
    """
    need_x, need_w, need_b, need_a, need_lb = needs
    T, d_in = x.shape
    ranks = [a.shape[0] for a in lora_as]
    starts = [sum(ranks[:i]) for i in range(len(ranks))]
    seed = _dropout_seed(dropout_p, seed)
    keep_scale = 1.0 if seed is None else 1.0 / (1.0 - dropout_p)

    ds = None
    if need_x or any(need_a):
        ds = x.new_empty(T, sum(ranks))
        for dy, lora_b, s, start, r in zip(dys, lora_bs, scales, starts, ranks):
            _shrink(ds[:, start : start + r], dy, lora_b.T, s)

    dlbs = [None] * len(lora_bs)
    for i, (dy, lora_b, s, start, r) in enumerate(zip(dys, lora_bs, scales, starts, ranks)):
        if need_lb[i]:
            dlbs[i] = lora_b.new_empty(lora_b.shape)
            _reduce(dlbs[i], dy, t[:, start : start + r], s)

    dlas = [None] * len(lora_as)
    if any(need_a):
        da = x.new_empty(sum(ranks), d_in)
        _reduce(da, ds, x, keep_scale, dropout_p, seed)
        if len(lora_as) == 1:
            dlas = [da]
        else:
            dlas = [da[s : s + r].clone() if n else None for s, r, n in zip(starts, ranks, need_a)]

    dx = None
    if need_x:
        dx = x.new_empty(T, d_in)
        pairs = list(zip(dys, weights))
        a_cat = _cat(lora_as)
        for c in range(0, len(pairs), _MAX_MAIN):
            first = c == 0
            _gemm(
                dx,
                pairs[c : c + _MAX_MAIN],
                low=ds if first else None,
                up=a_cat if first else None,
                low_scale=keep_scale,
                dropout_p=dropout_p,
                seed=seed if first else None,
                accumulate=not first,
            )

    dws = [None] * len(weights)
    for i, (dy, w) in enumerate(zip(dys, weights)):
        if need_w[i]:
            dws[i] = w.new_empty(w.shape)
            _reduce(dws[i], dy, x, 1.0)
    # A column sum: nothing to fuse, torch's reduction is as good as any.
    dbs = [dy.sum(0, dtype=torch.float32).to(x.dtype) if n else None for dy, n in zip(dys, need_b)]
    return dx, dws, dbs, dlas, dlbs


def dropout_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The bool keep mask (True = kept) that forward/backward draw for x of `shape` with (p, seed)."""
    shape = tuple(shape)
    out = torch.empty(shape, dtype=torch.bool, device=device)
    numel = math.prod(shape)
    if numel == 0:
        return out
    block = 4096 if INTERPRET else 1024
    _dropout_mask_kernel[(triton.cdiv(numel, block),)](
        out.view(torch.uint8), numel, float(dropout_p), int(seed), WIDE=wide(numel), BLOCK=block
    )
    return out
