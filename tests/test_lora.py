"""The LoRA op against fastadapters.reference.lora_linear, on every backend that can run here.

Forward and every gradient; fp32, fp16, bf16; token counts 1, 7, 97, 130 and ranks 1, 7, 64, 130 (a
covering subset: the Triton interpreter is slow); non-contiguous and 3-D x, transposed weights; the grouped
op; empty batches; dropout reproduced from its seed; random shapes (hypothesis); bad input.
"""

import math

import pytest
import torch
from conftest import (
    DEVICE,
    HYPOTHESIS,
    TOLERANCES,
    assert_close,
    op_seed,
    reference_mask,
    skip_module_without_device,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fastadapters import ops, reference
from fastadapters.ops import lora as lora_ops

skip_module_without_device()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _backend_params():
    params = []
    for name in ("torch", "triton", "cpu"):
        why = lora_ops.BACKENDS[name].reasons(device=DEVICE, dtype=torch.float32)
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(bool(why), reason="; ".join(why))))
    return params


BACKENDS = _backend_params()


def require(backend, dtype):
    """Skips when `backend` declares it cannot run `dtype` here (forcing it would raise its reasons)."""
    why = lora_ops.BACKENDS[backend].reasons(device=DEVICE, dtype=dtype)
    if why:
        pytest.skip(f"{backend} cannot run {dtype}: " + "; ".join(why))


# --------------------------------------------------------------------------------------------- helpers


def make_leaves(lead, d_in, d_out, rank, dtype, *, bias=True, grad_base=False, x_transposed=False,
                w_transposed=False):  # fmt: skip
    """The leaf tensors of one LoRA call, scaled so every output is O(1).

    x_transposed / w_transposed store x and the weight transposed (the call then passes a .T view).
    """
    x = torch.randn(*lead, d_in)
    weight = torch.randn(d_out, d_in) / math.sqrt(d_in)
    leaves = {
        "x": x.T.contiguous() if x_transposed else x,
        "weight": weight.T.contiguous() if w_transposed else weight,
        "bias": torch.randn(d_out) if bias else None,
        "lora_a": torch.randn(rank, d_in) / math.sqrt(d_in),
        "lora_b": torch.randn(d_out, rank) / math.sqrt(rank),
    }
    grads = {"x": True, "weight": grad_base, "bias": grad_base, "lora_a": True, "lora_b": True}
    return {
        k: None if v is None else v.to(DEVICE, dtype).requires_grad_(grads[k]) for k, v in leaves.items()
    }, (x_transposed, w_transposed)


def build_args(leaves, layout):
    x_transposed, w_transposed = layout
    x = leaves["x"].T if x_transposed else leaves["x"]
    w = leaves["weight"].T if w_transposed else leaves["weight"]
    return x, w, leaves["bias"], leaves["lora_a"], leaves["lora_b"]


def fp32_copies(leaves):
    return {
        k: None if v is None else v.detach().float().requires_grad_(v.requires_grad)
        for k, v in leaves.items()
    }


def upstream_grad(y):
    """A random dy scaled like a mean-reduced loss's, so the token-summed gradients (dW, dA, dB) stay O(1)."""
    tokens = max(1, y.numel() // max(1, y.shape[-1]))
    return (torch.randn(y.shape, device=DEVICE) / math.sqrt(tokens)).to(y.dtype)


def compare_grads(leaves, ref_leaves, dtype, prefix=""):
    for name, leaf in leaves.items():
        if leaf is None:
            continue
        if leaf.requires_grad:
            assert leaf.grad is not None, f"{prefix}{name} got no gradient"
            assert leaf.grad.shape == leaf.shape and leaf.grad.dtype == leaf.dtype
            assert_close(leaf.grad, ref_leaves[name].grad, dtype, f"d{prefix}{name}")
        else:
            assert leaf.grad is None, f"frozen {prefix}{name} got a gradient"


def check_lora(
    backend, leaves, layout, scale, *, dropout_p=0.0, training=False, torch_seed=1234, backward_backend=None
):
    """Runs the op under `backend` and the fp32 reference (same dropout mask); compares y and every grad.

    backward_backend: the backend forced while backward runs (default: `backend`).
    """
    dtype = leaves["x"].dtype
    require(backend, dtype)
    x, w, b, a, lb = build_args(leaves, layout)
    with ops.use_backend(backend):
        torch.manual_seed(torch_seed)
        y = ops.lora_linear(x, w, b, a, lb, scale, dropout_p=dropout_p, training=training)
    dy = upstream_grad(y)
    with ops.use_backend(backward_backend or backend):
        y.backward(dy)
    mask = None
    if training and dropout_p > 0:
        mask = reference_mask(ops.lora_dropout_mask, backend, x.shape, dropout_p, op_seed(torch_seed))
    ref_leaves = fp32_copies(leaves)
    yr = reference.lora_linear(*build_args(ref_leaves, layout), scale, dropout_mask=mask)
    yr.backward(dy.float())
    assert y.shape == yr.shape and y.dtype == dtype and y.device == x.device
    assert_close(y, yr, dtype, "y")
    compare_grads(leaves, ref_leaves, dtype)
    return y


# -------------------------------------------------------------------------------- forward/backward

# Every token count and every rank once per dtype (a Latin square), with odd dims below and above the
# interpreter's block of 128, with and without bias, frozen and trainable base weights.
CASES = [
    # dtype, N, rank, d_in, d_out, bias, grad_base
    (torch.float32, 1, 130, 37, 29, True, True),
    (torch.float32, 7, 64, 130, 19, False, False),
    (torch.float32, 97, 7, 19, 130, True, False),
    (torch.float32, 130, 1, 70, 33, True, True),
    (torch.float16, 1, 1, 19, 130, True, False),
    (torch.float16, 7, 130, 70, 33, True, True),
    (torch.float16, 97, 64, 37, 29, False, True),
    (torch.float16, 130, 7, 130, 19, True, False),
    (torch.bfloat16, 1, 7, 70, 33, False, True),
    (torch.bfloat16, 7, 1, 37, 29, True, False),
    (torch.bfloat16, 97, 130, 130, 19, True, False),
    (torch.bfloat16, 130, 64, 19, 130, True, True),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,n,rank,d_in,d_out,bias,grad_base",
    CASES,
    ids=[f"{str(c[0])[6:]}-N{c[1]}-r{c[2]}-{c[3]}x{c[4]}" for c in CASES],
)
def test_matches_reference(backend, dtype, n, rank, d_in, d_out, bias, grad_base):
    leaves, layout = make_leaves((n,), d_in, d_out, rank, dtype, bias=bias, grad_base=grad_base)
    check_lora(backend, leaves, layout, scale=2.0)


LAYOUTS = {
    # name: (lead dims, x stored transposed, weight stored transposed)
    "x-transposed": ((37,), True, False),
    "weight-transposed": ((37,), False, True),
    "both-transposed": ((37,), True, True),
    "3d": ((3, 13), False, False),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts(backend, dtype, layout):
    lead, x_t, w_t = LAYOUTS[layout]
    leaves, lay = make_leaves(lead, 45, 23, 5, dtype, grad_base=True, x_transposed=x_t, w_transposed=w_t)
    x, w, *_ = build_args(leaves, lay)
    assert x.is_contiguous() != x_t and w.is_contiguous() != w_t
    check_lora(backend, leaves, lay, scale=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_and_permuted_x(backend):
    """x as a strided slice of a wider tensor, and a 3-D x whose last dim is not the innermost one."""
    dtype = torch.float32
    base = torch.randn(29, 2 * 41, device=DEVICE)
    weight = torch.randn(17, 41, device=DEVICE) / math.sqrt(41)
    lora_a = torch.randn(6, 41, device=DEVICE, requires_grad=True)
    lora_b = torch.randn(17, 6, device=DEVICE, requires_grad=True)
    for x in (base[:, ::2], base.reshape(29, 41, 2).permute(2, 0, 1)):
        x = x.detach().requires_grad_()
        assert not x.is_contiguous()
        with ops.use_backend(backend):
            y = ops.lora_linear(x, weight, None, lora_a, lora_b, 1.5)
        dy = torch.randn_like(y)
        gx, ga, gb = torch.autograd.grad(y, (x, lora_a, lora_b), dy)
        xr, ar, br = (t.detach().requires_grad_() for t in (x, lora_a, lora_b))
        yr = reference.lora_linear(xr, weight, None, ar, br, 1.5)
        rx, ra, rb = torch.autograd.grad(yr, (xr, ar, br), dy)
        assert_close(y, yr, dtype, "y")
        for name, got, want in (("dx", gx, rx), ("dlora_a", ga, ra), ("dlora_b", gb, rb)):
            assert_close(got, want, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=["N0", "B2xS0"])
def test_empty_batch(backend, lead):
    leaves, layout = make_leaves(lead, 11, 9, 3, torch.float32, grad_base=True)
    x, w, b, a, lb = build_args(leaves, layout)
    with ops.use_backend(backend):
        y = ops.lora_linear(x, w, b, a, lb, 1.0)
        assert y.shape == (*lead, 9)
        y.sum().backward()
    assert leaves["x"].grad.shape == leaves["x"].shape
    for name in ("weight", "bias", "lora_a", "lora_b"):
        torch.testing.assert_close(leaves[name].grad, torch.zeros_like(leaves[name]), msg=f"d{name}")


# --------------------------------------------------------------------------------------------- grouped


def grouped_members(dtype, d_in, ranks, d_outs, grad_base_of=(), no_bias_of=()):
    members = []
    for i, (r, d_out) in enumerate(zip(ranks, d_outs)):
        leaves, _ = make_leaves(
            (1,), d_in, d_out, r, dtype, bias=i not in no_bias_of, grad_base=i in grad_base_of
        )
        del leaves["x"]
        members.append(leaves)
    return members


def check_grouped(backend, x_leaf, members, scales, *, dropout_p=0.0, training=False, torch_seed=99):
    dtype = x_leaf.dtype
    require(backend, dtype)
    fields = ("weight", "bias", "lora_a", "lora_b")
    with ops.use_backend(backend):
        torch.manual_seed(torch_seed)
        ys = ops.lora_linear_grouped(
            x_leaf, *[[m[f] for m in members] for f in fields], scales, dropout_p=dropout_p, training=training
        )
        assert len(ys) == len(members)
        dys = [upstream_grad(y) for y in ys]
        torch.autograd.backward(ys, dys)
    mask = None
    if training and dropout_p > 0:
        mask = reference_mask(ops.lora_dropout_mask, backend, x_leaf.shape, dropout_p, op_seed(torch_seed))
    xr = x_leaf.detach().float().requires_grad_()
    for i, (m, s, y, dy) in enumerate(zip(members, scales, ys, dys)):
        mr = fp32_copies(m)
        yr = reference.lora_linear(xr, *[mr[f] for f in fields], s, dropout_mask=mask)
        yr.backward(dy.float())
        assert y.shape == yr.shape and y.dtype == dtype
        assert_close(y, yr, dtype, f"y[{i}]")
        compare_grads(m, mr, dtype, prefix=f"[{i}].")
    assert_close(x_leaf.grad, xr.grad, dtype, "dx")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype,ranks,d_outs",
    [
        (torch.float32, (1, 7, 64), (17, 29, 5)),
        (torch.bfloat16, (8, 3, 130), (33, 19, 24)),
        # Four members: more than one launch's worth of (dy_i, W_i) pairs in the Triton dx kernel.
        (torch.float16, (2, 5, 3, 9), (13, 7, 21, 16)),
    ],
    ids=["float32-3", "bfloat16-3", "float16-4"],
)
def test_grouped_matches_members(backend, dtype, ranks, d_outs):
    members = grouped_members(dtype, 37, ranks, d_outs, grad_base_of=(1,), no_bias_of=(2,))
    x = torch.randn(3, 11, 37, device=DEVICE, dtype=dtype, requires_grad=True)
    check_grouped(backend, x, members, [0.5 * (i + 1) for i in range(len(ranks))])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_dropout_shares_one_mask(backend):
    members = grouped_members(torch.float32, 29, (4, 9, 2), (11, 6, 15))
    x = torch.randn(41, 29, device=DEVICE, requires_grad=True)
    check_grouped(backend, x, members, [1.0, 2.0, 0.25], dropout_p=0.3, training=True)


# --------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_reproducible(backend):
    with ops.use_backend(backend):
        m1 = ops.lora_dropout_mask((61, 37), 0.25, 12345, DEVICE)
        m2 = ops.lora_dropout_mask((61, 37), 0.25, 12345, DEVICE)
        m3 = ops.lora_dropout_mask((61, 37), 0.25, 12346, DEVICE)
    assert torch.equal(m1, m2)
    assert not torch.equal(m1, m3)
    # Two independent masks with keep rate 0.75 agree on 0.75² + 0.25² = 62.5% of elements.
    assert 0.5 < (m1 == m3).float().mean().item() < 0.75


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.05, 0.5])
def test_dropout_keep_rate(backend, dropout_p):
    n = 200_000
    with ops.use_backend(backend):
        keep = ops.lora_dropout_mask((400, 500), dropout_p, 7, DEVICE)
    sigma = math.sqrt(dropout_p * (1 - dropout_p) / n)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - dropout_p)) < 4 * sigma, f"keep rate {rate} vs {1 - dropout_p} ± {4 * sigma}"


DROPOUT_CASES = {
    # name: (dtype, lead, d_in, d_out, rank, x stored transposed)
    "float32": (torch.float32, (53,), 41, 23, 7, False),
    "float16-3d": (torch.float16, (3, 17), 33, 12, 16, False),
    "bfloat16-x-transposed": (torch.bfloat16, (29,), 70, 19, 5, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DROPOUT_CASES))
def test_dropout_matches_reference_with_same_mask(backend, case):
    dtype, lead, d_in, d_out, rank, x_t = DROPOUT_CASES[case]
    leaves, layout = make_leaves(lead, d_in, d_out, rank, dtype, grad_base=True, x_transposed=x_t)
    y = check_lora(backend, leaves, layout, 2.0, dropout_p=0.3, training=True)
    # Dropout did something: the same call without it differs.
    x, w, b, a, lb = build_args(leaves, layout)
    with ops.use_backend(backend), torch.no_grad():
        y_eval = ops.lora_linear(x, w, b, a, lb, 2.0, dropout_p=0.3, training=False)
    assert not torch.allclose(
        y.detach().float(), y_eval.float(), **dict(zip(("atol", "rtol"), TOLERANCES[dtype]))
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_runs_on_forward_backend(backend):
    """Forcing another backend between forward and backward must not change the mask backward uses."""
    other = "triton" if backend == "torch" else "torch"
    leaves, layout = make_leaves((19,), 23, 9, 3, torch.float32, grad_base=True)
    check_lora(backend, leaves, layout, 1.0, dropout_p=0.4, training=True, backward_backend=other)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_same_torch_seed_same_output(backend):
    leaves, layout = make_leaves((31,), 27, 14, 4, torch.float32)
    args = build_args(leaves, layout)
    with ops.use_backend(backend), torch.no_grad():
        outs = []
        for s in (5, 5, 6):
            torch.manual_seed(s)
            outs.append(ops.lora_linear(*args, 1.0, dropout_p=0.5, training=True))
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dropout_when_not_training(backend):
    leaves, layout = make_leaves((23,), 19, 11, 3, torch.float32)
    check_lora(backend, leaves, layout, 1.0, dropout_p=0.9, training=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_saves_no_dropout_copy(backend):
    """Backward keeps x itself and the rank-r t, never a dropped copy of x."""
    leaves, layout = make_leaves((37,), 29, 13, 4, torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with ops.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ops.lora_linear(*build_args(leaves, layout), 1.0, dropout_p=0.2, training=True)
    x_sized = [t for t in saved if t.numel() == leaves["x"].numel()]
    assert len(x_sized) == 1 and x_sized[0].data_ptr() == leaves["x"].data_ptr(), [t.shape for t in saved]
    assert any(t.shape == (37, 4) for t in saved)
    y.sum().backward()


# --------------------------------------------------------------------------------------------- random shapes


def random_case(data, dtypes):
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    lead = data.draw(st.lists(st.integers(0, 9), min_size=1, max_size=3), label="lead")
    d_in = data.draw(st.integers(1, 40), label="d_in")
    d_out = data.draw(st.integers(1, 40), label="d_out")
    rank = data.draw(st.integers(1, 24), label="rank")
    bias = data.draw(st.booleans(), label="bias")
    grad_base = data.draw(st.booleans(), label="grad_base")
    w_t = data.draw(st.booleans(), label="w_transposed")
    torch.manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    return make_leaves(lead, d_in, d_out, rank, dtype, bias=bias, grad_base=grad_base, w_transposed=w_t)


@settings(max_examples=25, **HYPOTHESIS)
@given(data=st.data())
def test_random_shapes_torch(data):
    leaves, layout = random_case(data, DTYPES)
    check_lora("torch", leaves, layout, scale=data.draw(st.floats(0.1, 4.0), label="scale"))


@pytest.mark.skipif(bool(lora_ops.BACKENDS["triton"].reasons(device=DEVICE)), reason="triton cannot run here")
@settings(max_examples=6, **HYPOTHESIS)
@given(data=st.data())
def test_random_shapes_triton(data):
    leaves, layout = random_case(data, DTYPES)
    check_lora("triton", leaves, layout, scale=data.draw(st.floats(0.1, 4.0), label="scale"))


# --------------------------------------------------------------------------------------------- compile


def test_torch_compile_fullgraph():
    leaves, layout = make_leaves((2, 5), 12, 7, 3, torch.float32, grad_base=True)
    args = build_args(leaves, layout)

    def step(x, w, b, a, lb):
        return ops.lora_linear(x, w, b, a, lb, 0.5, dropout_p=0.1, training=True)

    with ops.use_backend("torch"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        torch.manual_seed(3)
        y = compiled(*args)
        y.sum().backward()
        grads = {k: v.grad.clone() for k, v in leaves.items()}
        for v in leaves.values():
            v.grad = None
        torch.manual_seed(3)
        step(*args).sum().backward()
    for k, v in leaves.items():
        torch.testing.assert_close(grads[k], v.grad, msg=f"d{k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_op_equals_eager_path(backend):
    """Eager calls skip the custom op (ops._autograd.EagerFunction); traced calls use it. Both must agree
    exactly, dropout mask included, and the custom op must pass torch.library.opcheck."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 12, device=DEVICE, requires_grad=True)
    ws = [torch.randn(d, 12, device=DEVICE) for d in (7, 5)]
    bs = [torch.randn(7, device=DEVICE, requires_grad=True), None]
    As = [torch.randn(r, 12, device=DEVICE, requires_grad=True) for r in (3, 2)]
    Bs = [torch.randn(d, r, device=DEVICE, requires_grad=True) for d, r in ((7, 3), (5, 2))]
    leaves = [x, bs[0], *As, *Bs]
    scales, p, seed = [0.5, 2.0], 0.3, 1234
    results = []
    with ops.use_backend(backend):
        args = (x, ws, lora_ops._biases(bs, x), As, Bs, scales, p, torch.tensor(seed))
        for call in (lora_ops.LORA_LINEAR, lora_ops.LORA_LINEAR.custom):  # eager, then the custom op
            ys, _ = call(*args)
            grads = torch.autograd.grad(sum((y * (i + 1)).sum() for i, y in enumerate(ys)), leaves)
            results.append([y.detach() for y in ys] + list(grads))
        torch.library.opcheck(
            lora_ops.LORA_LINEAR.custom, args, test_utils=("test_schema", "test_faketensor")
        )
    for i, (a, b) in enumerate(zip(*results)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"output/grad {i}")


# --------------------------------------------------------------------------------------------- bad input


def _good(d_in=6, d_out=5, rank=2, dtype=torch.float32, device=DEVICE):
    return dict(
        x=torch.randn(4, d_in, dtype=dtype, device=device),
        weight=torch.randn(d_out, d_in, dtype=dtype, device=device),
        bias=torch.randn(d_out, dtype=dtype, device=device),
        lora_a=torch.randn(rank, d_in, dtype=dtype, device=device),
        lora_b=torch.randn(d_out, rank, dtype=dtype, device=device),
        scale=1.0,
    )


BAD = {
    # name: (argument replaced, new value, exception, message start)
    "x-not-tensor": ("x", [[1.0] * 6] * 4, TypeError, "x "),
    "x-int": ("x", torch.ones(4, 6, dtype=torch.int64), TypeError, "x "),
    "x-0d": ("x", torch.tensor(1.0), ValueError, "x "),
    "weight-d_in": ("weight", torch.randn(5, 7), ValueError, "weight "),
    "weight-1d": ("weight", torch.randn(30), ValueError, "weight "),
    "weight-dtype": ("weight", torch.randn(5, 6, dtype=torch.float16), TypeError, "weight "),
    "weight-device": ("weight", torch.randn(5, 6, device="meta"), ValueError, "weight "),
    "bias-shape": ("bias", torch.randn(6), ValueError, "bias "),
    "bias-not-tensor": ("bias", 1.0, TypeError, "bias "),
    "lora_a-d_in": ("lora_a", torch.randn(2, 5), ValueError, "lora_a "),
    "lora_a-int": ("lora_a", torch.ones(2, 6, dtype=torch.int32), TypeError, "lora_a "),
    "lora_a-device": ("lora_a", torch.randn(2, 6, device="meta"), ValueError, "lora_a "),
    "lora_a-rank0": ("lora_a", torch.randn(0, 6), ValueError, "lora_a "),
    "lora_b-rank": ("lora_b", torch.randn(5, 3), ValueError, "lora_b "),
    "lora_b-d_out": ("lora_b", torch.randn(4, 2), ValueError, "lora_b "),
    "lora_b-dtype": ("lora_b", torch.randn(5, 2, dtype=torch.bfloat16), TypeError, "lora_b "),
    "lora_b-not-tensor": ("lora_b", None, TypeError, "lora_b "),
    "scale-tensor": ("scale", torch.tensor(1.0), TypeError, "scale "),
    "scale-nan": ("scale", float("nan"), TypeError, "scale "),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case):
    arg, value, exc, start = BAD[case]
    kwargs = _good()
    if isinstance(value, torch.Tensor) and value.device.type != "meta":
        value = value.to(DEVICE)
    kwargs[arg] = value
    with pytest.raises(exc) as info:
        ops.lora_linear(**kwargs)
    assert str(info.value).startswith(start), str(info.value)


def test_rank0_both_factors():
    kwargs = _good()
    kwargs.update(lora_a=torch.randn(0, 6, device=DEVICE), lora_b=torch.randn(5, 0, device=DEVICE))
    with pytest.raises(ValueError, match=r"^lora_a .*rank"):
        ops.lora_linear(**kwargs)


def test_zero_input_features():
    """d_in = 0 (x, weight and lora_a all empty in their last dimension) is refused naming x and d_in, not
    with a reshape error from inside the op."""
    kwargs = _good(d_in=0)
    with pytest.raises(ValueError, match=r"^x must have a last dimension \(d_in\) >= 1, got shape \(4, 0\)"):
        ops.lora_linear(**kwargs)
    members = dict(weights=[kwargs["weight"]], biases=[None], lora_as=[kwargs["lora_a"]],
                   lora_bs=[kwargs["lora_b"]], scales=[1.0])  # fmt: skip
    with pytest.raises(ValueError, match=r"^x must have a last dimension \(d_in\) >= 1"):
        ops.lora_linear_grouped(kwargs["x"], **members)


def test_device_mismatch_x_on_meta():
    kwargs = _good()
    kwargs["x"] = torch.randn(4, 6, device="meta")
    with pytest.raises(ValueError, match=r"^weight .*device"):
        ops.lora_linear(**kwargs)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "dropout_p, exc", [(-0.1, ValueError), (1.0, ValueError), (1.5, ValueError), ("0.1", TypeError)]
)
def test_bad_dropout(dropout_p, exc, training):
    with pytest.raises(exc, match=r"^dropout_p "):
        ops.lora_linear(**_good(), dropout_p=dropout_p, training=training)


def test_grouped_bad_input_names_member():
    good = _good()
    members = dict(
        weights=[good["weight"]] * 3,
        biases=[good["bias"], None, good["bias"]],
        lora_as=[good["lora_a"]] * 3,
        lora_bs=[good["lora_b"]] * 3,
        scales=[1.0, 2.0, 3.0],
    )
    bad = dict(members, lora_bs=[good["lora_b"], good["lora_b"], torch.randn(5, 3, device=DEVICE)])
    with pytest.raises(ValueError, match=r"^lora_b\[2\] "):
        ops.lora_linear_grouped(good["x"], **bad)
    bad = dict(members, weights=[good["weight"], good["weight"].half(), good["weight"]])
    with pytest.raises(TypeError, match=r"^weight\[1\] "):
        ops.lora_linear_grouped(good["x"], **bad)
    with pytest.raises(ValueError, match="one length"):
        ops.lora_linear_grouped(good["x"], **dict(members, scales=[1.0, 2.0]))
    with pytest.raises(ValueError, match="one length"):
        ops.lora_linear_grouped(good["x"], **{k: [] for k in members})


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="FASTADAPTERS_BACKEND"):
        with ops.use_backend("nonsense"):
            pass


def test_forced_cpu_backend_unavailable_raises(monkeypatch):
    """Without the compiled extension, forcing the cpu backend refuses with the reason, no fallback."""
    from fastadapters import _ext

    monkeypatch.setattr(_ext, "AVAILABLE", False)
    monkeypatch.setattr(_ext, "ERROR", "simulated missing build")
    with ops.use_backend("cpu"), pytest.raises(RuntimeError, match="FASTADAPTERS_BACKEND=cpu") as info:
        ops.lora_linear(**_good(device="cpu"))
    assert "simulated missing build" in str(info.value)


def test_forced_triton_without_interpreter_raises(monkeypatch):
    """Triton on CPU tensors needs TRITON_INTERPRET=1; without it the forced backend refuses, saying so."""
    import fastadapters.kernels

    monkeypatch.setattr(fastadapters.kernels, "INTERPRET", False)
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.lora_linear(**_good(device="cpu"))


@pytest.mark.skipif(bool(lora_ops.BACKENDS["triton"].reasons(device=DEVICE)), reason="triton cannot run here")
def test_triton_wide_offsets_mask():
    """Tensors past 2**31 elements index the mask with int64 offsets: same seed, same mask; rate 1 - p."""
    from fastadapters.kernels import lora as triton_lora

    masks = []
    for seed in (11, 11, 12):
        out = torch.empty(50_000, dtype=torch.uint8, device=DEVICE)
        triton_lora._dropout_mask_kernel[(13,)](out, out.numel(), 0.25, seed, WIDE=True, BLOCK=4096)
        masks.append(out)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    sigma = math.sqrt(0.25 * 0.75 / 50_000)
    assert abs(masks[0].float().mean().item() - 0.75) < 4 * sigma
