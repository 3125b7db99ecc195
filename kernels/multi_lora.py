"""Triton backend of the multi-LoRA op: y[i] += scales[a] · (x[i] A_aᵀ) B_aᵀ, a = adapter of token i.

Implements the interface documented in fastadapters/ops/multi_lora.py (`prepare`, `forward`). The base GEMM
is torch's (cuBLAS); two kernels add every adapter of the batch in one launch each:
- `_multi_lora_shrink_kernel`: t[i, :r_a] = x[i] [A_{0,a}; A_{1,a}; …]ᵀ for every token, all members of a
  group at once (x read once). On a small grid (decode) the d_in reduction is split over programs that
  atomically add into an fp32 t.
- `_multi_lora_expand_kernel`: y_m[i] += scales[m][a] · t[i, member m's columns] B_{m,a}ᵀ, added straight
  into member m's base output (each (token, column) belongs to one program: no atomics).
Work is listed as tiles: (adapter, block of BLOCK_M of its tokens), read from a table built on the device
from the schedule (no host sync), so a launch has ⌈N/BLOCK_M⌉ + min(n, N) programs at most whatever the
bank size, and the tokens are read through the sorted index list, never regrouped. An adapter of rank r
loads r rows of A and B (masked tiles, no padding to the largest rank in the bank).
"""

import functools

import torch
import triton
import triton.language as tl
from fastadapters.kernels import INTERPRET
from fastadapters.kernels._common import activation, dot, dtype_flags, load_tile, pow2

# Tests set this to force the split-K (atomic) shrink path, which only a GPU's small grids pick.
FORCE_SPLIT_K: int | None = None


@triton.jit
def _tokens(order_ptr, starts_ptr, tiles_ptr, adapter, pid, NUM_TILES, HAS_ORDER: tl.constexpr,
            BLOCK_M: tl.constexpr):  # fmt: skip
    """The BLOCK_M token indices of tile `pid` (of `adapter`) and their mask."""
    block = tl.load(tiles_ptr + NUM_TILES + pid).to(tl.int64)
    seg_end = tl.load(starts_ptr + adapter + 1)
    pos = tl.load(starts_ptr + adapter) + block * BLOCK_M + tl.arange(0, BLOCK_M)
    mask = pos < seg_end
    if HAS_ORDER:
        tok = tl.load(order_ptr + pos, mask=mask, other=0)
    else:
        # Sorted ids: the segment is a contiguous token range.
        tok = pos
    return tok.to(tl.int64), mask


@triton.jit
def _multi_lora_shrink_kernel(
    x_ptr, bank_a_ptr, t_ptr, order_ptr, starts_ptr, tiles_ptr, meta_ptr,
    NUM_ADAPTERS, NUM_TILES, D_IN, K_PER_SPLIT,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_tr,
    HAS_ORDER: tl.constexpr, ATOMIC: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """t[tok, :rows_a] (+)= x[tok, k-range] · bank_a[a_off : a_off + rows_a, k-range]ᵀ for one tile."""
    pid = tl.program_id(0)
    adapter = tl.load(tiles_ptr + pid)
    if adapter >= NUM_ADAPTERS:
        return
    rows = tl.load(meta_ptr + NUM_ADAPTERS + adapter)
    if rows == 0:
        return
    a_off = tl.load(meta_ptr + adapter)
    tok, mask_m = _tokens(order_ptr, starts_ptr, tiles_ptr, adapter, pid, NUM_TILES, HAS_ORDER, BLOCK_M)
    a_ptr = bank_a_ptr + a_off * stride_ar  # this adapter's rows of the bank
    k_start = tl.program_id(1).to(tl.int64) * K_PER_SPLIT
    k_end = tl.minimum(D_IN, k_start + K_PER_SPLIT)
    for r0 in range(0, rows, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rows
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_end
            x = tl.load(
                x_ptr + tok[:, None] * stride_xm + offs_k[None, :].to(tl.int64) * stride_xk,
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            if UPCAST:  # as load_tile does: bf16 arithmetic is wrong in the interpreter
                x = x.to(tl.float32)
            a_t = load_tile(a_ptr, offs_k, offs_r, k_end, rows, stride_ak, stride_ar, UPCAST)
            acc = dot(x, a_t, acc, IEEE)
        t_ptrs = t_ptr + tok[:, None] * stride_tm + offs_r[None, :] * stride_tr
        mask = mask_m[:, None] & mask_r[None, :]
        if ATOMIC:
            tl.atomic_add(t_ptrs, acc, mask=mask)
        else:
            tl.store(t_ptrs, acc, mask=mask)


@triton.jit
def _multi_lora_expand_kernel(
    t_ptr, y_ptr, bank_b_ptr, order_ptr, starts_ptr, tiles_ptr, meta_ptr, scales_ptr, acts_ptr,
    NUM_ADAPTERS, NUM_TILES, MEMBER, D_OUT,
    stride_tm, stride_tr, stride_ym, stride_yn, stride_br, stride_bn,
    HAS_ORDER: tl.constexpr, HAS_ACT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """y[tok, n-block] += scale · f(t[tok, t_col : t_col + r]) · bank_b[b_off : b_off + r, n-block], one tile.

    f is the identity (LoRA), or with HAS_ACT the adapter's activation (the per-row bottleneck adapter).
    """
    pid = tl.program_id(0)
    adapter = tl.load(tiles_ptr + pid)
    if adapter >= NUM_ADAPTERS:
        return
    row = (2 + 3 * MEMBER) * NUM_ADAPTERS + adapter
    rank = tl.load(meta_ptr + row)
    if rank == 0:
        return
    t_col = tl.load(meta_ptr + row + NUM_ADAPTERS)
    b_off = tl.load(meta_ptr + row + 2 * NUM_ADAPTERS)
    scale = tl.load(scales_ptr + MEMBER * NUM_ADAPTERS + adapter)
    tok, mask_m = _tokens(order_ptr, starts_ptr, tiles_ptr, adapter, pid, NUM_TILES, HAS_ORDER, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < D_OUT
    if HAS_ACT:
        act = tl.load(acts_ptr + adapter)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        t = tl.load(
            t_ptr + tok[:, None] * stride_tm + (t_col + offs_r)[None, :].to(tl.int64) * stride_tr,
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        if HAS_ACT:
            # Columns past the rank become f(0) (0.5 for sigmoid): harmless, their rows of b load as 0.
            t, _ = activation(t, act)
        b = tl.load(
            bank_b_ptr + (b_off + offs_r)[:, None].to(tl.int64) * stride_br + offs_n[None, :] * stride_bn,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        )
        # t is fp32: the expand runs in fp32 (it is memory-bound; B tiles are tiny).
        acc = dot(t, b.to(tl.float32), acc, IEEE)
    mask = mask_m[:, None] & mask_n[None, :]
    y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + scale * acc).to(y_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------- host side


def block_m(num_tokens: int) -> int:
    """Tokens per tile: small for decode (one token per row, a few per adapter), larger for prefill."""
    if num_tokens <= 64:
        return 16
    return 32 if num_tokens <= 1024 else 64


def num_tiles(num_tokens: int, num_adapters: int) -> int:
    """An upper bound of Σ_a ⌈count_a / BLOCK_M⌉ over the adapters present: the launch's grid size."""
    return triton.cdiv(num_tokens, block_m(num_tokens)) + min(num_adapters, num_tokens)


def prepare(schedule) -> torch.Tensor:
    """The tile table [2, G] int32: row 0 the adapter of tile g (n: no tile), row 1 its block of tokens."""
    n, count = schedule.num_adapters, schedule.num_tokens
    g = num_tiles(count, n)
    dev = schedule.device
    if n == 0 or g == 0:
        return torch.full((2, g), n, dtype=torch.int32, device=dev)
    bm = block_m(count)
    starts = schedule.starts
    blocks = (starts[1:] - starts[:-1] + bm - 1) // bm
    ends = torch.cumsum(blocks, 0)
    pid = torch.arange(g, device=dev, dtype=torch.int64)
    adapter = torch.searchsorted(ends, pid, right=True)
    first = (ends - blocks)[adapter.clamp(max=n - 1)]
    return torch.stack([adapter, pid - first]).to(torch.int32)


@functools.lru_cache(maxsize=256)
def _device_meta(ranks: tuple, scales: tuple, layout: tuple, device: torch.device):
    """(meta int64 [2 + 3k, n], scales fp32 [k, n], max rows, max member rank), cached per bank layout.

    layout: the bank's (a_off, a_rows, t_col, b_off), as the op passes it (fastadapters/ops/schedule.py).
    """
    a_off, a_rows, t_col, b_off = layout
    k = len(t_col)
    n = len(ranks) // k
    rows = [a_off, a_rows]
    for m in range(k):
        rows += [list(ranks[m * n : (m + 1) * n]), t_col[m], b_off[m]]
    meta = torch.tensor(rows, dtype=torch.int64).to(device)
    scales_t = torch.tensor(scales, dtype=torch.float32).reshape(k, n).to(device)
    return meta, scales_t, max(a_rows, default=0), max(ranks, default=0)


def _split_k(tiles: int, d_in: int, block_k: int, device: torch.device) -> int:
    if FORCE_SPLIT_K is not None:
        return FORCE_SPLIT_K
    if INTERPRET or device.type != "cuda":
        return 1
    # Decode grids (a few tiles) cannot fill the GPU: split the d_in reduction, t accumulates atomically.
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(d_in, block_k), target // max(tiles, 1)))


def forward(x, weights, biases, bank_a, bank_bs, ranks, scales, layout, adapter_ids, order, starts, tiles):
    """ys[m] = x W_mᵀ + b_m, then every token's adapter added in place: one shrink, one expand per member.

    x: [N, d_in] (any strides); weights[m]: [d_out_m, d_in]; biases[m]: [d_out_m] or None; bank layout,
    ranks/scales (flattened member-major), order/starts (the schedule) and tiles (`prepare`) as in
    fastadapters/ops/multi_lora.py.
    """
    ys = [x @ w.T if b is None else torch.addmm(b, x, w.T) for w, b in zip(weights, biases)]
    add(x, ys, bank_a, bank_bs, ranks, scales, layout, order, starts, tiles)
    return ys


def bottleneck_forward(
    h, bank_down, bank_up, sizes, scales, layout, acts, adapter_ids, order, starts, tiles, residual
):
    """out = res + s_a · f_a(h D_aᵀ) U_aᵀ per token (res = h or residual): the multi-LoRA launches with the
    adapter's activation applied to the shrink output as the expand loads it."""
    out = (h if residual is None else residual).clone()
    add(h, [out], bank_down, [bank_up], sizes, scales, layout, order, starts, tiles, acts)
    return out


def add(x, ys, bank_a, bank_bs, ranks, scales, layout, order, starts, tiles, acts=None):
    """ys[m][i] += scale · f(x[i] A_{m,a}ᵀ) B_{m,a}ᵀ in place: one shrink launch, one expand per member."""
    k = len(ys)
    n = len(ranks) // k
    count, d_in = x.shape
    if n == 0 or count == 0 or sum(ranks) == 0:
        return
    meta, scales_t, max_rows, max_rank = _device_meta(tuple(ranks), tuple(scales), tuple(layout), x.device)
    acts_t = _device_acts(tuple(acts), x.device) if acts is not None else scales_t
    g = tiles.shape[1]
    bm = block_m(count)
    flags = dtype_flags(x.dtype)
    has_order = order.numel() > 0
    order_arg = order if has_order else starts
    block_k = pow2(d_in, 16, 128) if INTERPRET else (64 if x.dtype == torch.float32 else 128)
    splits = _split_k(g, d_in, block_k, x.device)
    k_per_split = triton.cdiv(triton.cdiv(d_in, splits), block_k) * block_k
    splits = triton.cdiv(d_in, k_per_split)
    t = (torch.zeros if splits > 1 else torch.empty)(count, max_rows, device=x.device, dtype=torch.float32)
    _multi_lora_shrink_kernel[(g, splits)](
        x, bank_a, t, order_arg, starts, tiles, meta,
        n, g, d_in, k_per_split,
        x.stride(0), x.stride(1), bank_a.stride(0), bank_a.stride(1), t.stride(0), t.stride(1),
        HAS_ORDER=has_order, ATOMIC=splits > 1, BLOCK_M=bm, BLOCK_R=pow2(max_rows, 16, 64), BLOCK_K=block_k,
        num_warps=4, **flags,
    )  # fmt: skip
    block_r = pow2(max_rank, 16, 64)
    for m, (y, bank_b) in enumerate(zip(ys, bank_bs)):
        d_out = y.shape[1]
        if sum(ranks[m * n : (m + 1) * n]) == 0 or d_out == 0:
            continue
        block_n = pow2(d_out, 16, 128) if INTERPRET else 64
        _multi_lora_expand_kernel[(g, triton.cdiv(d_out, block_n))](
            t, y, bank_b, order_arg, starts, tiles, meta, scales_t, acts_t,
            n, g, m, d_out,
            t.stride(0), t.stride(1), y.stride(0), y.stride(1), bank_b.stride(0), bank_b.stride(1),
            HAS_ORDER=has_order, HAS_ACT=acts is not None, BLOCK_M=bm, BLOCK_R=block_r, BLOCK_N=block_n,
            num_warps=4, **flags,
        )  # fmt: skip


@functools.lru_cache(maxsize=64)
def _device_acts(acts: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(acts, dtype=torch.int32).to(device)
