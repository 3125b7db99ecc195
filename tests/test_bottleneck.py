"""The bottleneck adapter op against fastadapters.reference.bottleneck_adapter, on every backend here.

Forward and every gradient (h, down, up, learned scale, residual); fp32, fp16, bf16; every activation; token
counts 1 and 97, bottlenecks 1, 7, 256 and 300 (the Triton two-kernel path); series and parallel forms;
non-contiguous and 3-D h; empty batches; dropout reproduced from its seed; what backward saves; random
shapes (hypothesis); torch.compile; bad input.
"""

import math

import pytest
import torch
from conftest import DEVICE, HYPOTHESIS, assert_close, op_seed, reference_mask, skip_module_without_device
from hypothesis import given, settings
from hypothesis import strategies as st

from fastadapters import config, ops, reference
from fastadapters.ops import bottleneck as bn_ops

# FASTADAPTERS_TEST_DEVICE=cuda (bench/gpu_check.sh) runs these on the GPU with compiled Triton kernels.
skip_module_without_device()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = bn_ops.ACTIVATIONS


def _backend_params():
    params = []
    for name in ("torch", "triton", "cpu"):
        why = bn_ops.BACKENDS[name].reasons(device=DEVICE, dtype=torch.float32, bottleneck=7)
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(bool(why), reason="; ".join(why))))
    return params


BACKENDS = _backend_params()
TRITON_REASONS = bn_ops.BACKENDS["triton"].reasons(device=DEVICE)


# --------------------------------------------------------------------------------------------- helpers


def make_leaves(lead, d_in, bottleneck, dtype, *, d_out=None, learned=False, h_transposed=False):
    """Leaf tensors of one call, scaled so z and the output are O(1). d_out given: the parallel form."""
    h = torch.randn(*lead, d_in)
    width = d_in if d_out is None else d_out
    leaves = {
        "h": h.transpose(-1, -2).contiguous() if h_transposed else h,
        "down": torch.randn(bottleneck, d_in) / math.sqrt(d_in),
        "up": torch.randn(width, bottleneck) / math.sqrt(bottleneck),
        "scale": torch.tensor(0.75) if learned else None,
        "residual": None if d_out is None else torch.randn(*lead, d_out),
    }
    return {k: None if v is None else v.to(DEVICE, dtype).requires_grad_() for k, v in leaves.items()}


def call_args(leaves, scale=0.75, h_transposed=False):
    h = leaves["h"].transpose(-1, -2) if h_transposed else leaves["h"]
    s = scale if leaves["scale"] is None else leaves["scale"]
    return h, leaves["down"], leaves["up"], s


def fp32_copies(leaves):
    return {k: None if v is None else v.detach().float().requires_grad_() for k, v in leaves.items()}


def upstream_grad(shape):
    """A random gradient scaled like a mean-reduced loss's, so token-summed gradients stay O(1)."""
    tokens = max(1, math.prod(shape[:-1]))
    return torch.randn(shape, device=DEVICE) / math.sqrt(tokens)


def run(fn, leaves, grad_out):
    """(output, {name: gradient}) of fn() with respect to every leaf."""
    out = fn()
    names = [k for k, v in leaves.items() if v is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in names], grad_out.to(out.dtype))
    return out, dict(zip(names, grads))


def check(backend, leaves, activation, *, scale=0.75, h_transposed=False, dropout_p=0.0, torch_seed=None):
    """Runs the op on `backend` and the fp32 reference on the same values; compares output and gradients."""
    dtype = leaves["h"].dtype
    ref_leaves = fp32_copies(leaves)
    h_shape = call_args(leaves, h_transposed=h_transposed)[0].shape
    mask = None
    if dropout_p > 0.0:
        mask = reference_mask(ops.bottleneck_dropout_mask, backend, h_shape, dropout_p, op_seed(torch_seed))

    def ours():
        if torch_seed is not None:
            torch.manual_seed(torch_seed)
        with ops.use_backend(backend):
            return ops.bottleneck_adapter(
                *call_args(leaves, scale, h_transposed),
                activation,
                dropout_p=dropout_p,
                training=dropout_p > 0,
                residual=leaves["residual"],
            )

    def ref():
        h, down, up, s = call_args(ref_leaves, scale, h_transposed)
        return reference.bottleneck_adapter(h, down, up, s, activation, mask, ref_leaves["residual"])

    grad_out = upstream_grad((*h_shape[:-1], leaves["up"].shape[0]))
    expected, ref_grads = run(ref, ref_leaves, grad_out)
    actual, grads = run(ours, leaves, grad_out)
    assert actual.dtype == dtype and actual.shape == expected.shape and actual.device == expected.device
    assert_close(actual, expected, dtype, "output")
    for name, g in grads.items():
        assert g.dtype == leaves[name].dtype and g.shape == leaves[name].shape, name
        assert_close(g, ref_grads[name], dtype, f"d{name}")


# --------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_matches_reference(backend, dtype, activation):
    # Series, 97 tokens, bottleneck 7, a float scale; then parallel, 1 token, bottleneck 1, learned scale.
    check(backend, make_leaves((97,), 40, 7, dtype), activation, scale=0.6)
    check(backend, make_leaves((1,), 24, 1, dtype, d_out=17, learned=True), activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n, d_in, bottleneck, d_out",
    [(97, 48, 256, None), (33, 40, 256, 29), (19, 24, 300, None), (7, 20, 300, 36)],
    ids=["b256-series", "b256-parallel", "b300-series", "b300-parallel"],
)
def test_bottleneck_sizes(backend, n, d_in, bottleneck, d_out):
    # 256 is the widest bottleneck the fused Triton forward keeps on chip; 300 takes its two-kernel path.
    check(backend, make_leaves((n,), d_in, bottleneck, torch.float32, d_out=d_out, learned=True), "gelu")


@pytest.mark.skipif(bool(TRITON_REASONS), reason="triton cannot run here")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_two_kernel_path(monkeypatch, dtype):
    from fastadapters.kernels import bottleneck as kernels

    monkeypatch.setattr(kernels, "FUSED_MAX_BOTTLENECK", 4)
    check("triton", make_leaves((37,), 24, 13, dtype, d_out=20, learned=True), "silu")
    check("triton", make_leaves((5,), 24, 13, dtype), "tanh", dropout_p=0.25, torch_seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_3d(backend):
    leaves = make_leaves((3, 11), 24, 7, torch.float32, d_out=18, learned=True)
    check(backend, leaves, "relu")
    # h stored transposed: the op gets a non-contiguous [24, 11]ᵀ view.
    leaves = make_leaves((11,), 24, 7, torch.float32, h_transposed=True)
    check(backend, leaves, "sigmoid", h_transposed=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parallel", [False, True], ids=["series", "parallel"])
def test_empty_batch(backend, parallel):
    leaves = make_leaves((0,), 16, 5, torch.float32, d_out=12 if parallel else None, learned=True)
    with ops.use_backend(backend):
        out = ops.bottleneck_adapter(*call_args(leaves), "tanh", residual=leaves["residual"])
        assert out.shape == (0, 12 if parallel else 16)
        out.sum().backward()
    assert torch.all(leaves["down"].grad == 0) and torch.all(leaves["up"].grad == 0)
    assert leaves["scale"].grad.shape == () and leaves["scale"].grad.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_inputs_get_no_gradient(backend):
    # Only the adapter weights train (the layer's usual case on a frozen first layer): dh is not computed.
    leaves = make_leaves((9,), 16, 5, torch.float32)
    leaves["h"].requires_grad_(False)
    with ops.use_backend(backend):
        ops.bottleneck_adapter(*call_args(leaves), "gelu").sum().backward()
    assert leaves["h"].grad is None and leaves["down"].grad is not None and leaves["up"].grad is not None


# --------------------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parallel", [False, True], ids=["series", "parallel"])
def test_dropout_matches_reference_with_same_mask(backend, parallel):
    leaves = make_leaves((23,), 32, 6, torch.float32, d_out=20 if parallel else None, learned=parallel)
    check(backend, leaves, "tanh", dropout_p=0.3, torch_seed=11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_reproducible_with_keep_rate(backend):
    with ops.use_backend(backend):
        a = ops.bottleneck_dropout_mask((64, 96), 0.3, 1234, DEVICE)
        b = ops.bottleneck_dropout_mask((64, 96), 0.3, 1234, DEVICE)
        c = ops.bottleneck_dropout_mask((64, 96), 0.3, 1235, DEVICE)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.float().mean().item() - 0.7) < 0.03


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_dropout_when_not_training(backend):
    leaves = make_leaves((13,), 16, 4, torch.float32)
    with ops.use_backend(backend), torch.no_grad():
        off = ops.bottleneck_adapter(*call_args(leaves), "tanh", dropout_p=0.5, training=False)
        on = ops.bottleneck_adapter(*call_args(leaves), "tanh", dropout_p=0.5, training=True)
        ref = reference.bottleneck_adapter(*call_args(leaves), "tanh")
    assert torch.equal(off, ref) or torch.allclose(off, ref, atol=1e-5)
    assert not torch.allclose(on, ref, atol=1e-3)


# --------------------------------------------------------------------------------------------- saved tensors


def saved_storages(fn):
    """{data_ptr: nbytes} of the distinct storages autograd saves while fn() runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "gelu"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_saved_for_backward(backend, activation, dropout_p):
    # Besides the inputs and weights, the torch backend saves one [N, b] tensor; Triton saves nothing
    # (it recomputes z); neither saves a dropout copy of h (the mask comes back from the seed).
    n, d, b = 64, 48, 8
    leaves = make_leaves((n,), d, b, torch.float32)
    h, down, up, _ = call_args(leaves)
    with ops.use_backend(backend):
        seen = saved_storages(lambda: ops.bottleneck_adapter(h, down, up, 0.5, activation, dropout_p, True))
    known = {t.untyped_storage().data_ptr() for t in (h, down, up)}
    extra = sorted(nbytes for ptr, nbytes in seen.items() if ptr not in known and nbytes > 8)
    per_row = 4 * b
    expected = [n * per_row] if bn_ops.BACKENDS[backend].module().SAVES_BOTTLENECK else []
    assert extra == expected, f"saved {extra} beyond the inputs, expected {expected}"


# --------------------------------------------------------------------------------------------- hypothesis


def random_case(data, dtypes):
    n = data.draw(st.integers(0, 40), label="n")
    d_in = data.draw(st.integers(1, 40), label="d_in")
    b = data.draw(st.integers(1, 40), label="bottleneck")
    parallel = data.draw(st.booleans(), label="parallel")
    d_out = data.draw(st.integers(1, 40), label="d_out") if parallel else None
    dtype = data.draw(st.sampled_from(dtypes), label="dtype")
    learned = data.draw(st.booleans(), label="learned")
    activation = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
    return make_leaves((n,), d_in, b, dtype, d_out=d_out, learned=learned), activation


@settings(max_examples=25, **HYPOTHESIS)
@given(data=st.data())
def test_random_shapes_torch(data):
    leaves, activation = random_case(data, DTYPES)
    check("torch", leaves, activation, scale=data.draw(st.floats(-2.0, 4.0), label="scale"))


@pytest.mark.skipif(bool(TRITON_REASONS), reason="triton cannot run here")
@settings(max_examples=6, **HYPOTHESIS)
@given(data=st.data())
def test_random_shapes_triton(data):
    leaves, activation = random_case(data, DTYPES)
    check("triton", leaves, activation, scale=data.draw(st.floats(-2.0, 4.0), label="scale"))


# --------------------------------------------------------------------------------------------- compile


def test_opcheck():
    leaves = make_leaves((2, 5), 12, 3, torch.float32, d_out=9, learned=True)
    h, down, up, s = call_args(leaves)
    args = (h, down, up, s, 1.0, "gelu", 0.0, None, leaves["residual"])
    # The compiled path is covered by test_torch_compile_fullgraph below.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(bn_ops._bottleneck_op, args, test_utils=utils)


def test_torch_compile_fullgraph():
    leaves = make_leaves((2, 5), 12, 3, torch.float32, learned=True)

    def step(h, down, up, s):
        return ops.bottleneck_adapter(h, down, up, s, "silu", dropout_p=0.1, training=True)

    with ops.use_backend("torch"):
        compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
        torch.manual_seed(3)
        compiled(*call_args(leaves)).sum().backward()
        grads = {k: v.grad.clone() for k, v in leaves.items() if v is not None}
        for v in leaves.values():
            if v is not None:
                v.grad = None
        torch.manual_seed(3)
        step(*call_args(leaves)).sum().backward()
    for k, g in grads.items():
        assert_close(g, leaves[k].grad, torch.float32, f"d{k}")


# --------------------------------------------------------------------------------------------- bad input


def _good():
    h = torch.randn(4, 8)
    return dict(
        h=h,
        down_weight=torch.randn(3, 8),
        up_weight=torch.randn(8, 3),
        scale=1.0,
        activation="tanh",
        residual=None,
    )


BAD = {
    "h-int": (dict(h=torch.ones(4, 8, dtype=torch.int64)), TypeError, "h must be float32"),
    "h-not-tensor": (dict(h=[[1.0] * 8]), TypeError, "h must be a torch.Tensor"),
    "down-shape": (dict(down_weight=torch.randn(3, 7)), ValueError, r"down_weight must have shape \(3, 8\)"),
    "down-1d": (dict(down_weight=torch.randn(8)), ValueError, "down_weight must have 2 dimensions"),
    "bottleneck-0": (
        dict(down_weight=torch.randn(0, 8), up_weight=torch.randn(8, 0)),
        ValueError,
        "bottleneck >= 1",
    ),
    "up-shape": (dict(up_weight=torch.randn(8, 4)), ValueError, r"up_weight must have shape \(d_out, 3\)"),
    "series-d_out": (dict(up_weight=torch.randn(5, 3)), ValueError, "series form"),
    "down-dtype": (
        dict(down_weight=torch.randn(3, 8, dtype=torch.float16)),
        TypeError,
        "down_weight must have h's dtype",
    ),
    "up-device": (
        dict(up_weight=torch.randn(8, 3, device="meta")),
        ValueError,
        "up_weight must be on h's device",
    ),
    "residual-shape": (
        dict(up_weight=torch.randn(5, 3), residual=torch.randn(4, 6)),
        ValueError,
        "residual must have",
    ),
    "residual-dtype": (
        dict(residual=torch.randn(4, 8, dtype=torch.bfloat16)),
        TypeError,
        "residual must have h's",
    ),
    "activation": (dict(activation="swish"), ValueError, "activation must be one of"),
    "scale-nan": (dict(scale=float("nan")), TypeError, "scale must be a finite"),
    "scale-1d": (dict(scale=torch.ones(1)), ValueError, "0-dim"),
    "scale-dtype": (
        dict(scale=torch.tensor(1.0, dtype=torch.float64)),
        TypeError,
        "scale must have h's dtype",
    ),
    "scale-str": (dict(scale="learned"), TypeError, "scale must be a finite"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input(case):
    change, exc, message = BAD[case]
    args = {**_good(), **change}
    with pytest.raises(exc, match=message):
        ops.bottleneck_adapter(**args)


@pytest.mark.parametrize("dropout_p, exc", [(1.0, ValueError), (-0.1, ValueError), ("0.1", TypeError)])
def test_bad_dropout(dropout_p, exc):
    with pytest.raises(exc, match="dropout_p"):
        ops.bottleneck_adapter(**_good(), dropout_p=dropout_p, training=True)


def test_forced_cpu_backend_unavailable_raises():
    if not bn_ops.BACKENDS["cpu"].reasons(device=torch.device("cpu")):
        pytest.skip("the compiled CPU bottleneck kernel is available")
    with ops.use_backend("cpu"), pytest.raises(RuntimeError, match="FASTADAPTERS_BACKEND=cpu"):
        ops.bottleneck_adapter(**_good())


@pytest.mark.skipif(bool(TRITON_REASONS), reason="triton cannot run here")
def test_forced_triton_too_wide_raises():
    args = {**_good(), "down_weight": torch.randn(1025, 8), "up_weight": torch.randn(8, 1025)}
    with ops.use_backend("triton"), pytest.raises(RuntimeError, match="bottleneck 1025 > 1024"):
        ops.bottleneck_adapter(**args)


def test_activation_lists_agree():
    from fastadapters.kernels import bottleneck as kernels

    assert bn_ops.ACTIVATIONS == config.BOTTLENECK_ACTIVATIONS == kernels.ACTIVATIONS
