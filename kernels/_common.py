"""The Triton conventions the four kernel files share, so each lives in one place.

Host side: `pow2` block sizes, `dtype_flags` (UPCAST: bf16 tiles become fp32 under the interpreter, whose
bf16 arithmetic is wrong; IEEE: fp32 dots stay full precision unless torch allows tf32), `wide` (dropout
counters past int32) and `launch`, which honours FASTADAPTERS_AUTOTUNE=0 for every autotuned kernel.
Device side, @triton.jit helpers: `dot` (the precision rule); `tile_offsets`, `load_tile`, `store_tile`
(masked, int64 offsets); `mm_loop`/`mm_loop_dropout` (one K loop, optional dropout on either operand);
`keep`/`keep_2d` (the dropout keep test: tl.rand(seed, element index) >= p); `activation` (f(z), f'(z)).
"""

import os

import torch
import triton
import triton.language as tl
from fastadapters.kernels import ACTIVATIONS, INTERPRET

_INT32_MAX = 2**31 - 1

# --------------------------------------------------------------------------------------------- host side


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """The power of two at or above n, clamped to [lo, hi] (tl.arange and tl.dot want power-of-2 blocks)."""
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return p if hi is None else min(hi, p)


def interp_block(n: int) -> int:
    """A block for the interpreter: large (its cost is per operation, not per element), >= 16 for tl.dot."""
    return pow2(n, 16, 128)


def dtype_flags(dtype: torch.dtype) -> dict:
    """The constexpr flags every dot-using kernel takes for operands of `dtype`: UPCAST and IEEE."""
    return {
        # bf16 arithmetic is wrong in the interpreter; loads and the cast to fp32 are right.
        "UPCAST": INTERPRET and dtype == torch.bfloat16,
        # fp32 dots default to tf32 on NVIDIA GPUs; follow torch's own fp32 matmul rule instead (its default,
        # "highest", is full precision).
        "IEEE": dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest",
    }


def wide(numel: int) -> bool:
    """Whether dropout counters (element indices) of a tensor of `numel` elements overflow int32."""
    return numel > _INT32_MAX


def autotune_enabled() -> bool:
    """False when FASTADAPTERS_AUTOTUNE=0: kernels then run their first config, untimed."""
    return os.environ.get("FASTADAPTERS_AUTOTUNE", "1") != "0"


def launch(tuned, grid, args, meta: dict, interp: dict) -> None:
    """Launches `tuned` (a triton.autotune object): autotuned; with FASTADAPTERS_AUTOTUNE=0 its first config,
    untimed; in the interpreter (which cannot time configs) its raw kernel with the `interp` blocks.
    `meta` holds the constexprs that are not tuned."""
    raw = tuned.fn
    if INTERPRET:
        raw[grid](*args, **meta, **interp, num_warps=4)
    elif autotune_enabled():
        tuned[grid](*args, **meta)
    else:
        cfg = tuned.configs[0]
        raw[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def activation_code(name: str) -> int:
    """The kernels' code of activation `name`: its index in fastadapters.kernels.ACTIVATIONS."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return ACTIVATIONS.index(name)


# --------------------------------------------------------------------------------------------- device side

# `activation` branches on these; the assertion keeps them and the table from drifting apart.
assert set(ACTIVATIONS) == {"tanh", "relu", "gelu", "silu", "sigmoid"}, ACTIVATIONS
_TANH = tl.constexpr(ACTIVATIONS.index("tanh"))
_RELU = tl.constexpr(ACTIVATIONS.index("relu"))
_GELU = tl.constexpr(ACTIVATIONS.index("gelu"))
_SILU = tl.constexpr(ACTIVATIONS.index("silu"))


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, full-precision fp32 products when IEEE (else the backend's default: tf32 for fp32)."""
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def tile_offsets(offs_r, offs_c, stride_r, stride_c):
    """The [len(offs_r), len(offs_c)] element offsets r · stride_r + c · stride_c, in int64."""
    # int64 offsets: strided views (a transposed x) overflow int32 long before the tensor is large.
    return offs_r.to(tl.int64)[:, None] * stride_r + offs_c.to(tl.int64)[None, :] * stride_c


@triton.jit
def load_tile(ptr, offs_r, offs_c, n_r, n_c, stride_r, stride_c, UPCAST: tl.constexpr):
    """The [len(offs_r), len(offs_c)] tile at ptr[r · stride_r + c · stride_c], 0 outside [n_r, n_c]."""
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    tile = tl.load(ptr + tile_offsets(offs_r, offs_c, stride_r, stride_c), mask=mask, other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def store_tile(ptr, value, offs_r, offs_c, n_r, n_c, stride_r, stride_c):
    """Stores value (cast to ptr's element type) at ptr[r · stride_r + c · stride_c] inside [n_r, n_c]."""
    mask = (offs_r[:, None] < n_r) & (offs_c[None, :] < n_c)
    offs = tile_offsets(offs_r, offs_c, stride_r, stride_c)
    tl.store(ptr + offs, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def keep(seed, idx, dropout_p, WIDE: tl.constexpr):
    """The dropout keep test of element `idx`: uniform(seed, idx) >= p. Every kernel draws masks with it."""
    if not WIDE:
        # Offsets that fit in int32 take triton's cheaper 32-bit Philox path on every version.
        idx = idx.to(tl.int32)
    return tl.rand(seed, idx) >= dropout_p


@triton.jit
def keep_2d(seed, rows, cols, row_len, dropout_p, WIDE: tl.constexpr):
    """keep() of a [len(rows), len(cols)] tile of a row-major [*, row_len] tensor (its logical layout, so
    the mask does not depend on the tensor's strides)."""
    idx = rows.to(tl.int64)[:, None] * row_len + cols.to(tl.int64)[None, :]
    return keep(seed, idx, dropout_p, WIDE)


@triton.jit
def mm_loop(
    acc, a_ptr, b_ptr, offs_m, offs_n, M, N, K, s_am, s_ak, s_bk, s_bn,
    BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """acc + A[offs_m, :] @ B[:, offs_n], A [M, K] and B [K, N] read through their strides."""
    return mm_loop_dropout(
        acc, a_ptr, b_ptr, offs_m, offs_n, M, N, 0, K, s_am, s_ak, s_bk, s_bn, 0, 0.0,
        False, False, False, BLOCK_K, UPCAST, IEEE,
    )  # fmt: skip


@triton.jit
def mm_loop_dropout(
    acc, a_ptr, b_ptr, offs_m, offs_n, M, N, k_start, k_end, s_am, s_ak, s_bk, s_bn, seed, dropout_p,
    DROP_A: tl.constexpr, DROP_B: tl.constexpr, WIDE: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """acc + drop(A)[offs_m, k] @ drop(B)[k, offs_n] over k in [k_start, k_end), A [M, K] and B [K, N] read
    through their strides. DROP_A zeroes A's dropped elements (keep_2d, row length k_end: the whole K range),
    DROP_B those of B (row length N). The 1/(1-p) is the caller's, on the fp32 result."""
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = load_tile(a_ptr, offs_m, offs_k, M, k_end, s_am, s_ak, UPCAST)
        b = load_tile(b_ptr, offs_k, offs_n, k_end, N, s_bk, s_bn, UPCAST)
        if DROP_A:
            a = tl.where(keep_2d(seed, offs_m, offs_k, k_end, dropout_p, WIDE), a, 0.0).to(a.dtype)
        if DROP_B:
            b = tl.where(keep_2d(seed, offs_k, offs_n, N, dropout_p, WIDE), b, 0.0).to(b.dtype)
        acc = dot(a, b.to(a.dtype), acc, IEEE)
    return acc


@triton.jit
def activation(z, code):
    """(f(z), f'(z)) in fp32 for f = ACTIVATIONS[code]; relu'(0) = 0 as in torch. `code` may be a constexpr
    (the branches fold away) or a per-program runtime value (one branch runs); unused f' costs nothing."""
    if code == _TANH:
        # tl has no tanh: tanh(z) = 2σ(2z) − 1 (exact to fp32 rounding, saturates cleanly at ±1).
        y = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        dy = 1.0 - y * y
    elif code == _RELU:
        y = tl.maximum(z, 0.0)
        dy = tl.where(z > 0.0, 1.0, 0.0)
    elif code == _GELU:  # exact (erf) gelu
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        y = z * cdf
        dy = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif code == _SILU:
        sig = tl.sigmoid(z)
        y = z * sig
        dy = sig * (1.0 + z * (1.0 - sig))
    else:  # sigmoid
        y = tl.sigmoid(z)
        dy = y * (1.0 - y)
    return y, dy
