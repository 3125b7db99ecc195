"""Triton kernels for the bottleneck adapter: out = residual + scale · up(f(down(drop(h)))).

Notation: h is [N, d_in]; D (down) is [b, d_in]; U (up) is [d_out, b]; z = drop(h) Dᵀ; a = f(z).

Forward. `fused_forward` runs one program per row tile: z accumulates on chip over d_in, a = f(z) stays on
chip, and the up-projection, the scale and the residual add are its epilogue, streamed over d_out; z and a
never reach global memory. Bottlenecks wider than FUSED_MAX_BOTTLENECK take two kernels instead:
`down_project` writes a = f(z), then `up_project` adds scale · a Uᵀ to the residual.

Backward saves nothing but h: `down_project` recomputes z, `bottleneck_grad` forms gU = g U and from it
dz = scale · gU ⊙ f'(z), a = f(z) and the per-tile partial sums of d_scale = Σ gU ⊙ a; then `up_project`
gives dh = g + dz D (g only in the series form) and `weight_grad` gives dU = scale · gᵀ a and
dD = dzᵀ drop(h).

Dropout never materialises drop(h): every kernel that reads h (or writes dh) regenerates the keep mask
from (seed, row · d_in + col) with tl.rand, so all of them agree; `dropout_mask` returns that mask.

The launchers below are the reusable pieces (the shared jitted helpers, activation included, live in
kernels/_common.py). They take 2-D tensors whose last dimension has unit stride, in fp32, fp16 or bf16, and
accumulate in fp32. Dropout zeroes elements inside the K loops; the 1/(1-p) scales the fp32 accumulator.
"""

import torch
import triton
import triton.language as tl
from fastadapters.kernels import ACTIVATIONS  # noqa: F401 (the one table; codes are its indices)
from fastadapters.kernels._common import (
    activation,
    activation_code,
    dot,
    dtype_flags,
    keep_2d,
    launch,
    load_tile,
    mm_loop,
    mm_loop_dropout,
    pow2,
    store_tile,
)

# Widest bottleneck whose [BLOCK_M, b] fp32 accumulator the fused forward keeps in registers.
FUSED_MAX_BOTTLENECK = 256
# The backward recomputes z from h, so the op saves no bottleneck-sized tensor.
SAVES_BOTTLENECK = False
# The dropout mask is drawn with int64 element indices whatever the size (keep_2d's WIDE path), as it always
# has been here: the same seed keeps giving the same mask.
_WIDE = tl.constexpr(True)


def _configs(rows: list[tuple], names: tuple[str, ...]) -> list[triton.Config]:
    """Autotune configs from (*blocks, warps, stages) rows."""
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


_MNK = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_GEMM_CONFIGS = [
    (64, 64, 64, 4, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 128, 32, 8, 3),
    (32, 64, 64, 4, 3),
]
# The interpreter runs one config (it cannot time them), with large blocks: its cost is per operation.
_INTERPRET_MNK = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)


# --------------------------------------------------------------------------------------------- helpers


@triton.jit
def _scale(scale_ptr, scale, SCALE_FROM_PTR: tl.constexpr):
    """The adapter scale in fp32: a float argument, or a 0-dim tensor read on the device (no host sync)."""
    if SCALE_FROM_PTR:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = scale
    return s


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _fused_forward_kernel(
    h_ptr, down_ptr, up_ptr, res_ptr, out_ptr, scale_ptr,
    n_rows, d_in, d_out, bottleneck, seed, scale, dropout_p,
    stride_hm, stride_dn, stride_un, stride_rm, stride_om,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Every operand has unit column stride (the launchers ensure it), so only row strides are passed.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    bs = tl.arange(0, BLOCK_B)

    z = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    z = mm_loop_dropout(
        z, h_ptr, down_ptr, rows, bs, n_rows, bottleneck, 0, d_in, stride_hm, 1, 1, stride_dn,
        seed, dropout_p, HAS_DROPOUT, False, _WIDE, BLOCK_K, UPCAST, IEEE,
    )  # fmt: skip
    if HAS_DROPOUT:
        z = z * (1.0 / (1.0 - dropout_p))

    # Padded bottleneck columns hold f(0) (0.5 for sigmoid); the masked U rows below are 0, so they add 0.
    a, _ = activation(z, ACT)
    if not UPCAST:
        a = a.to(up_ptr.dtype.element_ty)
    s = _scale(scale_ptr, scale, SCALE_FROM_PTR)

    for n0 in range(0, d_out, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        u_t = load_tile(up_ptr, bs, ns, bottleneck, d_out, 1, stride_un, UPCAST)
        y = dot(a, u_t, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
        r = load_tile(res_ptr, rows, ns, n_rows, d_out, stride_rm, 1, True)
        store_tile(out_ptr, r + s * y, rows, ns, n_rows, d_out, stride_om, 1)


@triton.jit
def _down_kernel(
    h_ptr, down_ptr, z_ptr,
    n_rows, d_in, bottleneck, seed, dropout_p,
    stride_hm, stride_dn,
    ACT: tl.constexpr, APPLY_ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # z[rows, cols] = drop(h) Dᵀ over one (row tile, bottleneck tile); writes f(z) when APPLY_ACT. z is
    # contiguous [n_rows, bottleneck].
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = mm_loop_dropout(
        acc, h_ptr, down_ptr, rows, cols, n_rows, bottleneck, 0, d_in, stride_hm, 1, 1, stride_dn,
        seed, dropout_p, HAS_DROPOUT, False, _WIDE, BLOCK_K, UPCAST, IEEE,
    )  # fmt: skip
    if HAS_DROPOUT:
        acc = acc * (1.0 / (1.0 - dropout_p))
    if APPLY_ACT:
        acc, _ = activation(acc, ACT)
    store_tile(z_ptr, acc, rows, cols, n_rows, bottleneck, bottleneck, 1)


@triton.jit
def _up_kernel(
    a_ptr, w_ptr, res_ptr, out_ptr, scale_ptr,
    n_rows, d_out, k_dim, seed, scale, dropout_p,
    stride_am, stride_wn, stride_wk, stride_rm, stride_om,
    HAS_RESIDUAL: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # out = residual + scale · keep ⊙ (a Wᵀ), W [d_out, k_dim] read through (stride_wn, stride_wk) so a
    # transposed view serves too (dh = g + keep ⊙ dz D uses W = Dᵀ). keep is the dropout mask of the
    # [n_rows, d_out] output positions, i.e. of h when d_out = d_in.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = mm_loop(
        acc, a_ptr, w_ptr, rows, cols, n_rows, d_out, k_dim, stride_am, 1, stride_wk, stride_wn,
        BLOCK_K, UPCAST, IEEE,
    )  # fmt: skip
    acc = acc * _scale(scale_ptr, scale, SCALE_FROM_PTR)
    if HAS_DROPOUT:
        kept = keep_2d(seed, rows, cols, d_out, dropout_p, _WIDE)
        acc = tl.where(kept, acc * (1.0 / (1.0 - dropout_p)), 0.0)
    if HAS_RESIDUAL:
        acc += load_tile(res_ptr, rows, cols, n_rows, d_out, stride_rm, 1, True)
    store_tile(out_ptr, acc, rows, cols, n_rows, d_out, stride_om, 1)


@triton.jit
def _bottleneck_grad_kernel(
    g_ptr, up_ptr, z_ptr, dz_ptr, a_ptr, partial_ptr, scale_ptr,
    n_rows, d_out, bottleneck, scale,
    stride_gm, stride_un,
    ACT: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, SCALE_GRAD: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # gU = g U over one (row tile, bottleneck tile) (K runs over d_out); then from the recomputed z:
    # dz = scale · gU ⊙ f'(z), a = f(z), and this tile's Σ gU ⊙ a (its share of d_scale). z, dz and a are
    # contiguous [n_rows, bottleneck]; partial_ptr holds one fp32 per program (written when SCALE_GRAD).
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = mm_loop(
        acc, g_ptr, up_ptr, rows, cols, n_rows, bottleneck, d_out, stride_gm, 1, stride_un, 1,
        BLOCK_K, UPCAST, IEEE,
    )  # fmt: skip
    z = load_tile(z_ptr, rows, cols, n_rows, bottleneck, bottleneck, 1, True)
    a, da_dz = activation(z, ACT)
    a = tl.where((rows < n_rows)[:, None] & (cols < bottleneck)[None, :], a, 0.0)
    if SCALE_GRAD:
        partial = tl.sum(tl.sum(acc * a, axis=1), axis=0)
        tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_n, partial)
    s = _scale(scale_ptr, scale, SCALE_FROM_PTR)
    store_tile(dz_ptr, s * acc * da_dz, rows, cols, n_rows, bottleneck, bottleneck, 1)
    store_tile(a_ptr, a, rows, cols, n_rows, bottleneck, bottleneck, 1)


@triton.jit
def _weight_grad_kernel(
    x_ptr, y_ptr, out_ptr, scale_ptr,
    n_rows, p_dim, q_dim, seed, scale, dropout_p,
    stride_xn, stride_yn, stride_op,
    SCALE_FROM_PTR: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # out[p, q] = scale · Σ_n x[n, p] · keep[n, q] · y[n, q]: a weight gradient, reduced over the rows.
    # keep is the dropout mask of y's [n_rows, q_dim] positions (y = h for dD).
    ps = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = tl.program_id(1).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    acc = mm_loop_dropout(
        acc, x_ptr, y_ptr, ps, qs, p_dim, q_dim, 0, n_rows, 1, stride_xn, stride_yn, 1,
        seed, dropout_p, False, HAS_DROPOUT, _WIDE, BLOCK_N, UPCAST, IEEE,
    )  # fmt: skip
    s = _scale(scale_ptr, scale, SCALE_FROM_PTR)
    if HAS_DROPOUT:
        s = s * (1.0 / (1.0 - dropout_p))
    store_tile(out_ptr, acc * s, ps, qs, p_dim, q_dim, stride_op, 1)


@triton.jit
def _dropout_mask_kernel(
    mask_ptr, n_rows, row_len, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    kept = keep_2d(seed, rows, cols, row_len, dropout_p, _WIDE)
    store_tile(mask_ptr, kept.to(tl.int8), rows, cols, n_rows, row_len, row_len, 1)


# Fused forward: (BLOCK_M, BLOCK_K, BLOCK_N, warps, stages); the small-tile ones fit shared memory even for
# fp32 at b = 256, so at least one config compiles for every dtype (the autotuner skips those that do not).
_FUSED_CONFIGS = [
    (16, 64, 64, 4, 3),
    (32, 64, 64, 4, 3),
    (64, 32, 64, 8, 2),
    (64, 64, 64, 8, 3),
    (16, 32, 32, 4, 2),
    (32, 32, 32, 4, 2),
]
_fused_tuned = triton.autotune(
    _configs(_FUSED_CONFIGS, ("BLOCK_M", "BLOCK_K", "BLOCK_N")), key=["d_in", "d_out", "BLOCK_B"]
)(_fused_forward_kernel)
_down_tuned = triton.autotune(_configs(_GEMM_CONFIGS, _MNK), key=["d_in", "bottleneck"])(_down_kernel)
_up_tuned = triton.autotune(_configs(_GEMM_CONFIGS, _MNK), key=["d_out", "k_dim"])(_up_kernel)
# reset_to_zero: configs with smaller tiles write more partial slots; zero them between autotuning runs.
_grad_tuned = triton.autotune(
    _configs(_GEMM_CONFIGS, _MNK), key=["d_out", "bottleneck"], reset_to_zero=["partial_ptr"]
)(_bottleneck_grad_kernel)
_weight_grad_tuned = triton.autotune(
    _configs(_GEMM_CONFIGS, ("BLOCK_P", "BLOCK_Q", "BLOCK_N")), key=["p_dim", "q_dim"]
)(_weight_grad_kernel)

# The smallest (BLOCK_M, BLOCK_N) tile any config of the grad kernel uses, which sizes its partial sums.
_GRAD_MIN_TILE = (
    min(c.kwargs["BLOCK_M"] for c in _grad_tuned.configs),
    min(c.kwargs["BLOCK_N"] for c in _grad_tuned.configs),
)


# --------------------------------------------------------------------------------------------- launchers


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along its last dimension (what the kernels index without a column stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _scale_args(scale, like: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """(scale_ptr, scale, SCALE_FROM_PTR): a 0-dim tensor scale is read on the device (no host sync)."""
    if isinstance(scale, torch.Tensor):
        return scale.reshape(1), 1.0, True
    return like, float(scale), False


def _dropout_args(dropout_p: float, seed: int | None) -> tuple[int, float, bool]:
    if seed is None or dropout_p == 0.0:
        return 0, 0.0, False
    return int(seed), float(dropout_p), True


def fused_forward(h, down, up, scale, activation: str, residual, out, dropout_p: float = 0.0, seed=None):
    """out = residual + scale · f(drop(h) Dᵀ) Uᵀ, one kernel per row tile (b <= FUSED_MAX_BOTTLENECK).

    h: [N, d_in]; down: [b, d_in]; up: [d_out, b]; residual, out: [N, d_out]; scale: float or 0-dim tensor.
    """
    n, d_in = h.shape
    b, d_out = down.shape[0], up.shape[0]
    scale_ptr, scale_f, from_ptr = _scale_args(scale, h)
    seed_i, p, has_dropout = _dropout_args(dropout_p, seed)
    down, up = _rows(down), _rows(up)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)
    args = (
        h, down, up, residual, out, scale_ptr,
        n, d_in, d_out, b, seed_i, scale_f, p,
        h.stride(0), down.stride(0), up.stride(0), residual.stride(0), out.stride(0),
    )  # fmt: skip
    meta = dict(
        ACT=activation_code(activation), HAS_DROPOUT=has_dropout, SCALE_FROM_PTR=from_ptr,
        BLOCK_B=pow2(b, 16), **dtype_flags(h.dtype),
    )  # fmt: skip
    launch(_fused_tuned, grid, args, meta, dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=64))
    return out


def down_project(h, down, activation: str | None, dropout_p: float = 0.0, seed=None, out_dtype=None):
    """f(drop(h) Dᵀ) as a new [N, b] tensor (z itself when activation is None), in out_dtype (default h's).

    h: [N, d_in]; down: [b, d_in].
    """
    n, d_in = h.shape
    b = down.shape[0]
    down = _rows(down)
    z = torch.empty((n, b), dtype=out_dtype or h.dtype, device=h.device)
    seed_i, p, has_dropout = _dropout_args(dropout_p, seed)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(b, meta["BLOCK_N"]))
    args = (h, down, z, n, d_in, b, seed_i, p, h.stride(0), down.stride(0))
    meta = dict(
        ACT=activation_code(activation or "tanh"), APPLY_ACT=activation is not None,
        HAS_DROPOUT=has_dropout, **dtype_flags(h.dtype),
    )  # fmt: skip
    launch(_down_tuned, grid, args, meta, _INTERPRET_MNK)
    return z


def up_project(a, weight, residual, scale, out, dropout_p: float = 0.0, seed=None):
    """out = residual + scale · keep ⊙ (a Wᵀ); residual None means 0; keep: dropout mask of out's positions.

    a: [N, k]; weight: [d_out, k] with any strides (a transposed view works); residual, out: [N, d_out].
    """
    n, k = a.shape
    d_out = weight.shape[0]
    scale_ptr, scale_f, from_ptr = _scale_args(scale, a)
    seed_i, p, has_dropout = _dropout_args(dropout_p, seed)
    res = out if residual is None else residual
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(d_out, meta["BLOCK_N"]))
    args = (
        a, weight, res, out, scale_ptr, n, d_out, k, seed_i, scale_f, p,
        a.stride(0), weight.stride(0), weight.stride(1), res.stride(0), out.stride(0),
    )  # fmt: skip
    meta = dict(
        HAS_RESIDUAL=residual is not None, SCALE_FROM_PTR=from_ptr, HAS_DROPOUT=has_dropout,
        **dtype_flags(a.dtype),
    )  # fmt: skip
    launch(_up_tuned, grid, args, meta, _INTERPRET_MNK)
    return out


def bottleneck_grad(grad, up, z, scale, activation: str, scale_grad: bool = True):
    """(dz, a, partials): dz = scale · (g U) ⊙ f'(z) and a = f(z) in grad's dtype, and fp32 partial sums
    whose total is d_scale = Σ (g U) ⊙ a (None unless scale_grad).

    grad: [N, d_out]; up: [d_out, b]; z: contiguous [N, b] (any float dtype).
    """
    n, d_out = grad.shape
    b = up.shape[1]
    up = _rows(up)
    dz = torch.empty((n, b), dtype=grad.dtype, device=grad.device)
    a = torch.empty_like(dz)
    scale_ptr, scale_f, from_ptr = _scale_args(scale, grad)
    partials = None
    if scale_grad:
        # Sized for the smallest tiles any config uses; each program writes its own slot, the rest stay 0.
        slots = triton.cdiv(n, _GRAD_MIN_TILE[0]) * triton.cdiv(b, _GRAD_MIN_TILE[1])
        partials = torch.zeros(slots, dtype=torch.float32, device=grad.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(b, meta["BLOCK_N"]))
    args = (
        grad, up, z, dz, a, dz if partials is None else partials, scale_ptr, n, d_out, b, scale_f,
        grad.stride(0), up.stride(0),
    )  # fmt: skip
    meta = dict(
        ACT=activation_code(activation), SCALE_FROM_PTR=from_ptr, SCALE_GRAD=scale_grad,
        **dtype_flags(grad.dtype),
    )  # fmt: skip
    launch(_grad_tuned, grid, args, meta, _INTERPRET_MNK)
    return dz, a, partials


def weight_grad(x, y, scale, dropout_p: float = 0.0, seed=None, out_dtype=None):
    """scale · xᵀ (keep ⊙ y) as a new [P, Q] tensor, keep being the dropout mask of y's positions.

    x: [N, P]; y: [N, Q].
    """
    n, p_dim = x.shape
    q_dim = y.shape[1]
    out = torch.empty((p_dim, q_dim), dtype=out_dtype or x.dtype, device=x.device)
    scale_ptr, scale_f, from_ptr = _scale_args(scale, x)
    seed_i, p, has_dropout = _dropout_args(dropout_p, seed)
    grid = lambda meta: (triton.cdiv(p_dim, meta["BLOCK_P"]), triton.cdiv(q_dim, meta["BLOCK_Q"]))
    args = (
        x,
        y,
        out,
        scale_ptr,
        n,
        p_dim,
        q_dim,
        seed_i,
        scale_f,
        p,
        x.stride(0),
        y.stride(0),
        out.stride(0),
    )
    meta = dict(SCALE_FROM_PTR=from_ptr, HAS_DROPOUT=has_dropout, **dtype_flags(x.dtype))
    launch(_weight_grad_tuned, grid, args, meta, dict(BLOCK_P=64, BLOCK_Q=64, BLOCK_N=64))
    return out


# ------------------------------------------------------------------------------ backend interface (ops)


def forward(h, down, up, scale, activation, dropout_p, seed, residual):
    """(out, empty): see fastadapters.ops.bottleneck for the interface. h: [N, d_in]."""
    h = _rows(h)
    n = h.shape[0]
    b, d_out = down.shape[0], up.shape[0]
    res = h if residual is None else _rows(residual)
    out = torch.empty((n, d_out), dtype=h.dtype, device=h.device)
    if n > 0:
        if b <= FUSED_MAX_BOTTLENECK:
            fused_forward(h, down, up, scale, activation, res, out, dropout_p, seed)
        else:
            a = down_project(h, down, activation, dropout_p, seed)
            up_project(a, up, res, scale, out)
    return out, h.new_empty(0)


def backward(grad, h, down, up, saved, scale, activation, dropout_p, seed, has_residual, needs):
    """(dh, d_down, d_up, d_scale), None where `needs` (h, down, up, scale) says not needed."""
    need_h, need_down, need_up, need_scale = needs
    grad, h = _rows(grad), _rows(h)
    n = h.shape[0]
    if n == 0:
        zeros = lambda t, flag: torch.zeros_like(t) if flag else None
        d_scale = h.new_zeros(()) if need_scale else None
        dh = grad.new_empty(h.shape) if need_h else None
        return dh, zeros(down, need_down), zeros(up, need_up), d_scale
    z = down_project(h, down, None, dropout_p, seed, out_dtype=torch.float32)
    dz, a, partials = bottleneck_grad(grad, up, z, scale, activation, scale_grad=need_scale)
    d_scale = partials.sum().to(h.dtype) if need_scale else None
    d_up = weight_grad(grad, a, scale, out_dtype=up.dtype) if need_up else None
    d_down = weight_grad(dz, h, 1.0, dropout_p, seed, out_dtype=down.dtype) if need_down else None
    dh = None
    if need_h:
        dh = torch.empty_like(h)
        up_project(dz, down.T, None if has_residual else grad, 1.0, dh, dropout_p, seed)
    return dh, d_down, d_up, d_scale


def dropout_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The bool keep mask (shape [..., d]) that these kernels draw for (dropout_p, seed)."""
    shape = tuple(shape)
    row_len = shape[-1] if shape else 1
    n = 1
    for s in shape[:-1]:
        n *= s
    mask = torch.empty((n, row_len), dtype=torch.int8, device=device)
    if mask.numel():
        grid = (triton.cdiv(n, 32), triton.cdiv(row_len, 64))
        _dropout_mask_kernel[grid](mask, n, row_len, int(seed), float(dropout_p), BLOCK_M=32, BLOCK_N=64)
    return mask.bool().reshape(shape)
