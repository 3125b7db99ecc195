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

The launchers below are the reusable pieces (a per-row multi-adapter variant can reuse the jitted
`_activation`, `_activation_and_grad` and `_dropout_multiplier` helpers). They take 2-D tensors whose last
dimension has unit stride, in fp32, fp16 or bf16, and accumulate in fp32.
"""

import torch
import triton
import triton.language as tl
from fastadapters.kernels import INTERPRET

ACTIVATIONS = ("tanh", "relu", "gelu", "silu", "sigmoid")
MAX_BOTTLENECK = 1024
# Widest bottleneck whose [BLOCK_M, b] fp32 accumulator the fused forward keeps in registers.
FUSED_MAX_BOTTLENECK = 256
# The backward recomputes z from h, so the op saves no bottleneck-sized tensor.
SAVES_BOTTLENECK = False


def _configs(gpu: list[tuple], interpret: tuple, names: tuple[str, ...]) -> list[triton.Config]:
    """Autotune configs: several on a GPU, one under the interpreter (which cannot time configs)."""
    rows = [interpret] if INTERPRET else gpu
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1]) for r in rows]


_MNK = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
_GEMM_CONFIGS = [
    (64, 64, 64, 4, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (128, 128, 32, 8, 3),
    (32, 64, 64, 4, 3),
]
_GEMM_INTERPRET = (64, 64, 64, 4, 1)


# --------------------------------------------------------------------------------------------- helpers


@triton.jit
def _activation(z, ACT: tl.constexpr):
    """f(z) in fp32 for ACT = index into ACTIVATIONS (tanh, relu, gelu (exact erf), silu, sigmoid)."""
    if ACT == 0:
        # tl has no tanh: tanh(z) = 2σ(2z) − 1 (exact to fp32 rounding, saturates cleanly at ±1).
        y = 2.0 * tl.sigmoid(2.0 * z) - 1.0
    elif ACT == 1:
        y = tl.maximum(z, 0.0)
    elif ACT == 2:
        y = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 3:
        y = z * tl.sigmoid(z)
    else:
        y = tl.sigmoid(z)
    return y


@triton.jit
def _activation_and_grad(z, ACT: tl.constexpr):
    """(f(z), f'(z)) in fp32; relu'(0) = 0 as in torch."""
    if ACT == 0:
        y = 2.0 * tl.sigmoid(2.0 * z) - 1.0
        dy = 1.0 - y * y
    elif ACT == 1:
        y = tl.maximum(z, 0.0)
        dy = tl.where(z > 0.0, 1.0, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        y = z * cdf
        dy = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 3:
        sig = tl.sigmoid(z)
        y = z * sig
        dy = sig * (1.0 + z * (1.0 - sig))
    else:
        y = tl.sigmoid(z)
        dy = y * (1.0 - y)
    return y, dy


@triton.jit
def _dropout_multiplier(rows, cols, row_len, seed, dropout_p):
    """[len(rows), len(cols)] fp32 of 0 or 1/(1-p): keep where uniform(seed, row·row_len + col) >= p.

    rows must be int64 so the Philox counter does not wrap on large tensors."""
    offsets = rows[:, None] * row_len + cols[None, :]
    keep = tl.rand(seed, offsets) >= dropout_p
    return tl.where(keep, 1.0 / (1.0 - dropout_p), 0.0)


# --------------------------------------------------------------------------------------------- kernels


@triton.autotune(
    configs=_configs(
        # (BLOCK_M, BLOCK_K, BLOCK_N, warps, stages); the small-tile ones fit shared memory even for fp32 at
        # b = 256, so at least one config compiles for every dtype (the autotuner skips those that do not).
        [
            (16, 64, 64, 4, 3),
            (32, 64, 64, 4, 3),
            (64, 32, 64, 8, 2),
            (64, 64, 64, 8, 3),
            (16, 32, 32, 4, 2),
            (32, 32, 32, 4, 2),
        ],
        (64, 64, 64, 4, 1),
        ("BLOCK_M", "BLOCK_K", "BLOCK_N"),
    ),
    key=["d_in", "d_out", "BLOCK_B"],
)
@triton.jit
def _fused_forward_kernel(
    h_ptr, down_ptr, up_ptr, res_ptr, out_ptr, scale_ptr,
    n_rows, d_in, d_out, bottleneck, seed, scale, dropout_p,
    stride_hm, stride_dn, stride_un, stride_rm, stride_om,
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # Every operand has unit column stride (the launchers ensure it), so only row strides are passed.
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    bs = tl.arange(0, BLOCK_B)
    b_ok = bs < bottleneck

    z = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d_in
        h = tl.load(
            h_ptr + rows[:, None] * stride_hm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        d_t = tl.load(
            down_ptr + bs[None, :] * stride_dn + ks[:, None], mask=k_ok[:, None] & b_ok[None, :], other=0.0
        )
        if UPCAST:  # the interpreter gets bf16 arithmetic wrong; fp32 tiles are exact there
            h = h.to(tl.float32)
            d_t = d_t.to(tl.float32)
        if HAS_DROPOUT:
            h = (h * _dropout_multiplier(rows, ks, d_in, seed, dropout_p)).to(d_t.dtype)
        z = tl.dot(h, d_t, z, input_precision=PRECISION)

    # Padded bottleneck columns hold f(0) (0.5 for sigmoid); the masked U rows below are 0, so they add 0.
    a = _activation(z, ACT)
    if not UPCAST:
        a = a.to(up_ptr.dtype.element_ty)
    if SCALE_FROM_PTR:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = scale

    for n0 in range(0, d_out, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < d_out
        u_t = tl.load(
            up_ptr + ns[None, :] * stride_un + bs[:, None], mask=b_ok[:, None] & n_ok[None, :], other=0.0
        )
        if UPCAST:
            u_t = u_t.to(tl.float32)
        y = tl.dot(a, u_t, input_precision=PRECISION)
        mask = row_ok[:, None] & n_ok[None, :]
        r = tl.load(res_ptr + rows[:, None] * stride_rm + ns[None, :], mask=mask, other=0.0).to(tl.float32)
        out = r + s * y
        tl.store(
            out_ptr + rows[:, None] * stride_om + ns[None, :], out.to(out_ptr.dtype.element_ty), mask=mask
        )


@triton.autotune(configs=_configs(_GEMM_CONFIGS, _GEMM_INTERPRET, _MNK), key=["d_in", "bottleneck"])
@triton.jit
def _down_kernel(
    h_ptr, down_ptr, z_ptr,
    n_rows, d_in, bottleneck, seed, dropout_p,
    stride_hm, stride_dn,
    ACT: tl.constexpr, APPLY_ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # z[rows, cols] = drop(h) Dᵀ over one (row tile, bottleneck tile); writes f(z) when APPLY_ACT. z is
    # contiguous [n_rows, bottleneck].
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < bottleneck
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d_in
        h = tl.load(
            h_ptr + rows[:, None] * stride_hm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        d_t = tl.load(
            down_ptr + cols[None, :] * stride_dn + ks[:, None],
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            h = h.to(tl.float32)
            d_t = d_t.to(tl.float32)
        if HAS_DROPOUT:
            h = (h * _dropout_multiplier(rows, ks, d_in, seed, dropout_p)).to(d_t.dtype)
        acc = tl.dot(h, d_t, acc, input_precision=PRECISION)
    if APPLY_ACT:
        acc = _activation(acc, ACT)
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(z_ptr + rows[:, None] * bottleneck + cols[None, :], acc.to(z_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_configs(_GEMM_CONFIGS, _GEMM_INTERPRET, _MNK), key=["d_out", "k_dim"])
@triton.jit
def _up_kernel(
    a_ptr, w_ptr, res_ptr, out_ptr, scale_ptr,
    n_rows, d_out, k_dim, seed, scale, dropout_p,
    stride_am, stride_wn, stride_wk, stride_rm, stride_om,
    HAS_RESIDUAL: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # out = residual + scale · keep ⊙ (a Wᵀ), W [d_out, k_dim] read through (stride_wn, stride_wk) so a
    # transposed view serves too (dh = g + keep ⊙ dz D uses W = Dᵀ). keep is the dropout mask of the
    # [n_rows, d_out] output positions, i.e. of h when d_out = d_in.
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < d_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, k_dim, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_dim
        a = tl.load(
            a_ptr + rows[:, None] * stride_am + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        w_t = tl.load(
            w_ptr + cols[None, :] * stride_wn + ks[:, None] * stride_wk,
            mask=k_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if UPCAST:
            a = a.to(tl.float32)
            w_t = w_t.to(tl.float32)
        acc = tl.dot(a, w_t.to(a.dtype), acc, input_precision=PRECISION)
    if SCALE_FROM_PTR:
        acc = acc * tl.load(scale_ptr).to(tl.float32)
    else:
        acc = acc * scale
    if HAS_DROPOUT:
        acc = acc * _dropout_multiplier(rows, cols, d_out, seed, dropout_p)
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


# reset_to_zero: configs with smaller tiles write more partial slots; zero them between autotuning runs.
@triton.autotune(
    configs=_configs(_GEMM_CONFIGS, _GEMM_INTERPRET, _MNK),
    key=["d_out", "bottleneck"],
    reset_to_zero=["partial_ptr"],
)
@triton.jit
def _bottleneck_grad_kernel(
    g_ptr, up_ptr, z_ptr, dz_ptr, a_ptr, partial_ptr, scale_ptr,
    n_rows, d_out, bottleneck, scale,
    stride_gm, stride_un,
    ACT: tl.constexpr, SCALE_FROM_PTR: tl.constexpr, SCALE_GRAD: tl.constexpr, UPCAST: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # gU = g U over one (row tile, bottleneck tile) (K runs over d_out); then from the recomputed z:
    # dz = scale · gU ⊙ f'(z), a = f(z), and this tile's Σ gU ⊙ a (its share of d_scale). z, dz and a are
    # contiguous [n_rows, bottleneck]; partial_ptr holds one fp32 per program (written when SCALE_GRAD).
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < bottleneck
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, d_out, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < d_out
        g = tl.load(
            g_ptr + rows[:, None] * stride_gm + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        u = tl.load(
            up_ptr + ks[:, None] * stride_un + cols[None, :], mask=k_ok[:, None] & col_ok[None, :], other=0.0
        )
        if UPCAST:
            g = g.to(tl.float32)
            u = u.to(tl.float32)
        acc = tl.dot(g, u, acc, input_precision=PRECISION)
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None] * bottleneck + cols[None, :]
    z = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da_dz = _activation_and_grad(z, ACT)
    a = tl.where(mask, a, 0.0)
    if SCALE_GRAD:
        partial = tl.sum(tl.sum(acc * a, axis=1), axis=0)
        tl.store(partial_ptr + pid_m * tl.num_programs(1) + pid_n, partial)
    if SCALE_FROM_PTR:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = scale
    tl.store(dz_ptr + offs, (s * acc * da_dz).to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(a_ptr + offs, a.to(a_ptr.dtype.element_ty), mask=mask)


_GRAD_MIN_TILE = (
    min(c.kwargs["BLOCK_M"] for c in _bottleneck_grad_kernel.configs),
    min(c.kwargs["BLOCK_N"] for c in _bottleneck_grad_kernel.configs),
)


@triton.autotune(
    configs=_configs(_GEMM_CONFIGS, _GEMM_INTERPRET, ("BLOCK_P", "BLOCK_Q", "BLOCK_N")),
    key=["p_dim", "q_dim"],
)
@triton.jit
def _weight_grad_kernel(
    x_ptr, y_ptr, out_ptr, scale_ptr,
    n_rows, p_dim, q_dim, seed, scale, dropout_p,
    stride_xn, stride_yn, stride_op,
    SCALE_FROM_PTR: tl.constexpr, HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # out[p, q] = scale · Σ_n x[n, p] · keep[n, q] · y[n, q]: a weight gradient, reduced over the rows.
    # keep is the dropout mask of y's [n_rows, q_dim] positions (y = h for dD).
    pid_p = tl.program_id(0).to(tl.int64)
    pid_q = tl.program_id(1).to(tl.int64)
    ps = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    qs = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    p_ok = ps < p_dim
    q_ok = qs < q_dim
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for n0 in range(0, n_rows, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_ok = ns < n_rows
        x_t = tl.load(
            x_ptr + ns[None, :] * stride_xn + ps[:, None], mask=p_ok[:, None] & n_ok[None, :], other=0.0
        )
        y = tl.load(
            y_ptr + ns[:, None] * stride_yn + qs[None, :], mask=n_ok[:, None] & q_ok[None, :], other=0.0
        )
        if UPCAST:
            x_t = x_t.to(tl.float32)
            y = y.to(tl.float32)
        if HAS_DROPOUT:
            y = y * _dropout_multiplier(ns, qs, q_dim, seed, dropout_p)
        acc = tl.dot(x_t, y.to(x_t.dtype), acc, input_precision=PRECISION)
    if SCALE_FROM_PTR:
        acc = acc * tl.load(scale_ptr).to(tl.float32)
    else:
        acc = acc * scale
    mask = p_ok[:, None] & q_ok[None, :]
    tl.store(out_ptr + ps[:, None] * stride_op + qs[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dropout_mask_kernel(
    mask_ptr, n_rows, row_len, seed, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_multiplier(rows, cols, row_len, seed, dropout_p) > 0.0
    mask = (rows < n_rows)[:, None] & (cols < row_len)[None, :]
    tl.store(mask_ptr + rows[:, None] * row_len + cols[None, :], keep.to(tl.int8), mask=mask)


# --------------------------------------------------------------------------------------------- launchers


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit stride along its last dimension (what the kernels index without a column stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _flags(dtype: torch.dtype) -> dict:
    upcast = INTERPRET and dtype == torch.bfloat16
    # fp32 operands must not fall to tf32 on the GPU: the op promises fp32 accuracy.
    precision = "ieee" if dtype == torch.float32 or upcast else "tf32"
    return {"UPCAST": upcast, "PRECISION": precision}


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
    _fused_forward_kernel[grid](
        h, down, up, residual, out, scale_ptr,
        n, d_in, d_out, b, seed_i, scale_f, p,
        h.stride(0), down.stride(0), up.stride(0), residual.stride(0), out.stride(0),
        ACT=ACTIVATIONS.index(activation), HAS_DROPOUT=has_dropout, SCALE_FROM_PTR=from_ptr,
        BLOCK_B=max(16, triton.next_power_of_2(b)), **_flags(h.dtype),
    )  # fmt: skip
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
    _down_kernel[grid](
        h, down, z, n, d_in, b, seed_i, p, h.stride(0), down.stride(0),
        ACT=ACTIVATIONS.index(activation or "tanh"), APPLY_ACT=activation is not None,
        HAS_DROPOUT=has_dropout, **_flags(h.dtype),
    )  # fmt: skip
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
    _up_kernel[grid](
        a, weight, res, out, scale_ptr, n, d_out, k, seed_i, scale_f, p,
        a.stride(0), weight.stride(0), weight.stride(1), res.stride(0), out.stride(0),
        HAS_RESIDUAL=residual is not None, SCALE_FROM_PTR=from_ptr, HAS_DROPOUT=has_dropout,
        **_flags(a.dtype),
    )  # fmt: skip
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
    _bottleneck_grad_kernel[grid](
        grad, up, z, dz, a, dz if partials is None else partials, scale_ptr, n, d_out, b, scale_f,
        grad.stride(0), up.stride(0), ACT=ACTIVATIONS.index(activation), SCALE_FROM_PTR=from_ptr,
        SCALE_GRAD=scale_grad, **_flags(grad.dtype),
    )  # fmt: skip
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
    _weight_grad_kernel[grid](
        x, y, out, scale_ptr, n, p_dim, q_dim, seed_i, scale_f, p, x.stride(0), y.stride(0), out.stride(0),
        SCALE_FROM_PTR=from_ptr, HAS_DROPOUT=has_dropout, **_flags(x.dtype),
    )  # fmt: skip
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
