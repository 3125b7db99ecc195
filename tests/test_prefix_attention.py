"""fastadapters.ops.prefix_attention against fastadapters.reference.prefix_attention (concatenation and an
explicit mask, fp32): forward and every gradient, for the torch backend broadly and the Triton kernels
(interpreter) on a covering subset; masks of every accepted form, the KV-cache decode shape, per-row
prefixes and bad input."""

import pytest
import torch
from conftest import DEVICE, TOLERANCES, assert_close, skip_module_without_device
from hypothesis import given, settings
from hypothesis import strategies as st

from fastadapters import reference
from fastadapters.ops import prefix_attention, use_backend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# FASTADAPTERS_TEST_DEVICE=cuda (bench/gpu_check.sh) runs these on the GPU: the Triton kernels compiled, and
# then every broad sweep on both backends (on the CPU the interpreter only affords the covering subset).
skip_module_without_device()
BROAD_BACKENDS = ("torch", "triton") if DEVICE.type == "cuda" else ("torch",)


def make_inputs(
    B=2, Hq=4, Hkv=2, S=17, S_kv=None, D=16, P=5, A=None, dtype=torch.float32, transposed_q=False, seed=0
):
    """q, k, v, prefix_k, prefix_v (leaf tensors requiring grad) and an upstream gradient."""
    gen = torch.Generator().manual_seed(seed)
    S_kv = S if S_kv is None else S_kv

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE, dtype)

    if transposed_q:  # the layout transformers hands over: [B, S, H, D] memory, viewed as [B, H, S, D]
        q = rand(B, S, Hq, D).transpose(1, 2)
    else:
        q = rand(B, Hq, S, D)
    pshape = (Hkv, P, D) if A is None else (A, Hkv, P, D)
    tensors = [q, rand(B, Hkv, S_kv, D), rand(B, Hkv, S_kv, D), rand(*pshape), rand(*pshape)]
    for t in tensors:
        t.requires_grad_(True)
    return tensors, rand(B, Hq, S, D)


def key_padding(B, S_kv, seed=0):
    """Left padding of different lengths per row, at least one key kept per row."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, S_kv + 1, (B,), generator=gen)
    return (torch.arange(S_kv)[None, :] >= (S_kv - lengths)[:, None]).to(DEVICE)


def check(tensors, dout, backend, dtype, **kw):
    """Forward and all five gradients of the op match the fp32 reference within the dtype's tolerance."""
    with use_backend(backend):
        out = prefix_attention(*tensors, **kw)
        grads = torch.autograd.grad(out, tensors, dout)
    ref_in = [t.detach().float().requires_grad_(True) for t in tensors]
    ref = reference.prefix_attention(*ref_in, **kw)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.float())
    assert out.dtype == dtype and out.shape == tensors[0].shape
    assert_close(out, ref, dtype, name=f"{backend} out")
    for name, g, r in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), grads, ref_grads):
        assert g.shape == r.shape and g.dtype == dtype, name
        assert_close(g, r, dtype, name=f"{backend} {name}")


# ------------------------------------------------------------------------------ torch backend


@pytest.mark.parametrize("backend", BROAD_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("P", (1, 10, 33))
@pytest.mark.parametrize("S", (1, 17, 64))
@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
@pytest.mark.parametrize("padded", (False, True), ids=("dense", "padded"))
def test_backend_matches_reference(backend, dtype, P, S, causal, padded):
    """GQA 4:2, the key padding mask of every row different, q in transformers' layout when S = 17."""
    tensors, dout = make_inputs(S=S, P=P, dtype=dtype, transposed_q=S == 17)
    mask = key_padding(2, S) if padded else None
    check(tensors, dout, backend, dtype, attention_mask=mask, causal=causal)


@pytest.mark.parametrize("backend", BROAD_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S", (1, 5))
def test_decode_with_cache(backend, dtype, S):
    """Queries are the last S of S_kv = 23 cached keys: bottom-right causal, padded cache rows."""
    tensors, dout = make_inputs(S=S, S_kv=23, P=10, dtype=dtype)
    check(tensors, dout, backend, dtype, attention_mask=key_padding(2, 23, seed=1).long())


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_per_row_prefix_ids(backend):
    """Rows pick prefixes 2, none, 0, 2; prefix gradients are summed per adapter, unused adapter 1 gets 0."""
    tensors, dout = make_inputs(B=4, Hq=2, Hkv=1, S=9, A=3, P=6)
    ids = torch.tensor([2, -1, 0, 2], device=DEVICE)
    check(tensors, dout, backend, torch.float32, adapter_ids=ids, attention_mask=key_padding(4, 9))
    with use_backend(backend):
        out = prefix_attention(*tensors, adapter_ids=ids)
        dpk = torch.autograd.grad(out, tensors[3], dout)[0]
    assert torch.count_nonzero(dpk[1]) == 0


def test_prefix_ids_is_a_deprecated_alias_of_adapter_ids():
    """The old keyword still works (same output, positionally too) and warns; both at once is an error."""
    tensors, _ = make_inputs(B=3, Hq=2, Hkv=1, S=5, A=2, P=4)
    ids = torch.tensor([1, -1, 0], device=DEVICE)
    new = prefix_attention(*tensors, adapter_ids=ids)
    with pytest.warns(DeprecationWarning, match="adapter_ids"):
        old = prefix_attention(*tensors, prefix_ids=ids)
    torch.testing.assert_close(old, new, rtol=0, atol=0)
    torch.testing.assert_close(prefix_attention(*tensors, None, True, None, ids), new, rtol=0, atol=0)
    with pytest.raises(TypeError, match="not both"):
        prefix_attention(*tensors, adapter_ids=ids, prefix_ids=ids)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=r"^prefix_ids must lie"):
        prefix_attention(*tensors, prefix_ids=torch.tensor([0, 2, 0], device=DEVICE))
    with pytest.raises(ValueError, match=r"^adapter_ids must lie"):
        prefix_attention(*tensors, adapter_ids=torch.tensor([0, 2, 0], device=DEVICE))


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_row_that_sees_nothing_is_zero(backend):
    """Row 0 has no prefix and every key masked: output 0, finite gradients (defined as 0)."""
    tensors, dout = make_inputs(B=2, Hq=2, Hkv=1, S=6, A=2, P=3)
    mask = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    mask[0] = False
    check(
        tensors,
        dout,
        backend,
        torch.float32,
        adapter_ids=torch.tensor([-1, 1], device=DEVICE),
        attention_mask=mask,
        causal=False,
    )
    with use_backend(backend):
        out = prefix_attention(
            *tensors, adapter_ids=torch.tensor([-1, 1], device=DEVICE), attention_mask=mask, causal=False
        )
    assert torch.count_nonzero(out[0]) == 0


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("per_row", (False, True), ids=("shared", "per-row"))
@pytest.mark.parametrize("padded", (False, True), ids=("dense", "padded"))
def test_nan_in_q_gives_nan_like_the_reference(backend, per_row, padded):
    """A NaN in one query row makes that row's output NaN, as in the reference, and nothing else (the CPU
    flash kernel of the shared-prefix path reported such a row as 0)."""
    tensors, _ = make_inputs(B=2, Hq=2, Hkv=1, S=5, P=3, A=2 if per_row else None)
    q, k, v, pk, pv = (t.detach() for t in tensors)
    q = q.clone()
    q[0, 1, 2, 3] = float("nan")
    kw = dict(
        adapter_ids=torch.tensor([1, -1], device=DEVICE) if per_row else None,
        attention_mask=key_padding(2, 5) if padded else None,
    )
    with use_backend(backend):
        out = prefix_attention(q, k, v, pk, pv, **kw)
    ref = reference.prefix_attention(q, k, v, pk, pv, **kw)
    assert ref[0, 1, 2].isnan().all() and ref.isnan().sum() == ref.shape[-1]
    assert torch.equal(out.isnan(), ref.isnan())
    finite = ~ref.isnan()
    assert_close(out[finite], ref[finite], torch.float32)


@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_nan_prefix_changes_no_other_row(backend):
    """One adapter's prefix NaN-filled: the rows of other prefixes, and of none (which the torch backend
    gathers prefix 0 for, then zero-fills), are bit-identical to the clean call."""
    tensors, _ = make_inputs(B=4, Hq=2, Hkv=1, S=4, A=2, P=3)
    q, k, v, pk, pv = (t.detach() for t in tensors)
    ids = torch.tensor([0, -1, 1, -1], device=DEVICE)
    bad_k, bad_v = pk.clone(), pv.clone()
    bad_k[0] = bad_v[0] = float("nan")
    with use_backend(backend):
        clean = prefix_attention(q, k, v, pk, pv, adapter_ids=ids)
        dirty = prefix_attention(q, k, v, bad_k, bad_v, adapter_ids=ids)
    assert dirty[0].isnan().all()
    assert torch.equal(dirty[1:], clean[1:])


@pytest.mark.parametrize("kind", ("bool-b1", "bool-1h", "additive-bh", "additive-finfo-min"), ids=lambda k: k)
@pytest.mark.parametrize("backend", ("torch", "triton"))
def test_4d_masks(kind, backend):
    """The masks transformers builds: 4-D bool (True = attend) and additive floats (ALiBi-like biases,
    finfo.min for masked keys), broadcast over batch or heads."""
    B, Hq, S = 2, 2, 11
    tensors, dout = make_inputs(B=B, Hq=Hq, Hkv=1, S=S, P=4)
    gen = torch.Generator().manual_seed(3)
    if kind == "bool-b1":
        mask = torch.rand(B, 1, S, S, generator=gen) > 0.3
    elif kind == "bool-1h":
        mask = torch.rand(1, Hq, S, S, generator=gen) > 0.3
    elif kind == "additive-bh":
        mask = torch.randn(B, Hq, S, S, generator=gen)
    else:
        mask = torch.zeros(B, 1, S, S).masked_fill(
            torch.rand(B, 1, S, S, generator=gen) > 0.5, torch.finfo(torch.float32).min
        )
        mask[0, :, 2] = torch.finfo(torch.float32).min  # a whole row "masked" the way HF's eager masks do
    check(
        tensors, dout, backend, torch.float32, attention_mask=mask.to(DEVICE), causal=kind.startswith("bool")
    )


@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 3),
    groups=st.sampled_from([(1, 1), (4, 1), (4, 2), (3, 3)]),
    S=st.integers(1, 20),
    extra=st.integers(0, 6),
    P=st.integers(1, 12),
    D=st.sampled_from([8, 16, 24]),
    causal=st.booleans(),
    padded=st.booleans(),
)
def test_torch_backend_property(B, groups, S, extra, P, D, causal, padded):
    Hq, Hkv = groups
    tensors, dout = make_inputs(B=B, Hq=Hq, Hkv=Hkv, S=S, S_kv=S + extra, D=D, P=P)
    mask = key_padding(B, S + extra) if padded else None
    check(tensors, dout, "torch", torch.float32, attention_mask=mask, causal=causal)


def test_only_needed_gradients_and_frozen_prefix():
    (q, k, v, pk, pv), dout = make_inputs(S=7)
    pk.requires_grad_(False)
    pv.requires_grad_(False)
    out = prefix_attention(q, k, v, pk, pv)
    dq, dk = torch.autograd.grad(out, (q, k), dout)
    ref = reference.prefix_attention(q.detach(), k.detach(), v.detach(), pk, pv)
    assert_close(out, ref, torch.float32)
    assert dq.shape == q.shape and dk.shape == k.shape


def test_custom_op_registration():
    """torch.library.opcheck: schema, fake tensor and autograd registration agree with the real op."""
    (q, k, v, pk, pv), _ = make_inputs(B=1, Hq=2, Hkv=1, S=5, P=3)
    from fastadapters.ops.prefix_attention import PREFIX_ATTENTION

    mask = torch.ones(1, 5, dtype=torch.bool, device=DEVICE)
    args = (q, k, v, pk, pv, mask, 1, True, 0.25, torch.empty(0, dtype=torch.int64, device=DEVICE))
    torch.library.opcheck(
        PREFIX_ATTENTION.custom,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


def test_empty_batch():
    (q, k, v, pk, pv), _ = make_inputs(B=0, S=4)
    out = prefix_attention(q, k, v, pk, pv)
    assert out.shape == q.shape


# ------------------------------------------------------------------------------ triton (interpreter)

# A covering subset: each dtype, P in {1, 10, 33}, S in {1, 17, 64}, GQA, padding, causal and not, a decode
# step over a cache, non-contiguous q. Shapes are small because the interpreter is slow.
TRITON_CASES = [
    dict(dtype=torch.float32, P=1, S=17, causal=True, padded=True, transposed_q=True),
    dict(dtype=torch.float32, P=10, S=64, causal=False, padded=False, Hq=2, Hkv=1, B=1),
    dict(dtype=torch.float32, P=33, S=17, causal=True, padded=False),
    dict(dtype=torch.float16, P=10, S=17, causal=True, padded=True),
    dict(dtype=torch.bfloat16, P=10, S=17, causal=False, padded=True),
    dict(dtype=torch.float32, P=10, S=1, S_kv=23, causal=True, padded=True),  # decode step over a cache
    dict(dtype=torch.bfloat16, P=1, S=1, S_kv=23, causal=True, padded=False),
    dict(dtype=torch.float16, P=33, S=5, S_kv=70, causal=True, padded=True, Hq=2, Hkv=1),  # chunked prefill
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_triton_matches_reference(case):
    case = dict(case)
    dtype, causal, padded = case.pop("dtype"), case.pop("causal"), case.pop("padded")
    tensors, dout = make_inputs(dtype=dtype, **case)
    B, S_kv = tensors[1].shape[0], tensors[1].shape[2]
    mask = key_padding(B, S_kv, seed=2) if padded else None
    check(tensors, dout, "triton", dtype, attention_mask=mask, causal=causal)


@pytest.mark.parametrize("D", (32, 64, 80, 96, 128))
def test_triton_head_dims(D):
    """Head dims that need padding to a power of two (80, 96) included."""
    tensors, dout = make_inputs(B=1, Hq=2, Hkv=1, S=9, D=D, P=3)
    check(tensors, dout, "triton", torch.float32, attention_mask=key_padding(1, 9))


def test_backends_agree_on_a_shape_the_tests_above_miss():
    """Several query blocks and key blocks in the Triton kernels (S > 64), GQA 3:1, a per-row prefix."""
    tensors, dout = make_inputs(B=2, Hq=3, Hkv=1, S=70, D=16, P=65, A=2)
    ids = torch.tensor([1, 0], device=DEVICE)
    mask = key_padding(2, 70, seed=5)
    outs = []
    for backend in ("torch", "triton"):
        with use_backend(backend):
            out = prefix_attention(*tensors, attention_mask=mask, adapter_ids=ids)
            outs.append((out, *torch.autograd.grad(out, tensors, dout)))
    for a, b in zip(*outs):
        assert_close(a, b, torch.float32)


# ------------------------------------------------------------------------------ bad input


def test_bad_input_raises_clearly():
    (q, k, v, pk, pv), _ = make_inputs(S=6, P=3)
    with pytest.raises(ValueError, match="prefix_k must have 2 key/value heads and head_dim 16"):
        prefix_attention(q, k, v, pk[:1], pv[:1])
    with pytest.raises(ValueError, match="head_dim 16"):
        prefix_attention(q, k, v, pk[..., :8], pv[..., :8])
    with pytest.raises(ValueError, match="P >= 1"):
        prefix_attention(q, k, v, pk[:, :0], pv[:, :0])
    with pytest.raises(ValueError, match=r"attention_mask \(key padding\) must have shape \(2, 6\)"):
        prefix_attention(q, k, v, pk, pv, attention_mask=torch.ones(2, 5, device=DEVICE))
    with pytest.raises(ValueError, match="4-D"):
        prefix_attention(
            q, k, v, pk, pv, attention_mask=torch.ones(2, 1, 6, 5, dtype=torch.bool, device=DEVICE)
        )
    with pytest.raises(ValueError, match="multiple"):
        prefix_attention(q[:, :3], k, v, pk, pv)
    with pytest.raises(ValueError, match="S_kv >= S"):
        prefix_attention(q, k[:, :, :4], v[:, :, :4], pk, pv)
    with pytest.raises(TypeError, match="dtype"):
        prefix_attention(q, k.half(), v, pk, pv)
    apk, apv = pk.detach().expand(3, *pk.shape), pv.detach().expand(3, *pv.shape)
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 3\)"):
        prefix_attention(q, k, v, apk, apv, adapter_ids=torch.tensor([0, 3], device=DEVICE))
    with pytest.raises(ValueError, match=r"adapter_ids must lie in \[-1, 3\)"):
        prefix_attention(q, k, v, apk, apv, adapter_ids=torch.tensor([-2, 0], device=DEVICE))
    with pytest.raises(ValueError, match="pass adapter_ids"):
        prefix_attention(q, k, v, apk, apv)
    with pytest.raises(ValueError, match="adapter_ids must be None"):
        prefix_attention(q, k, v, pk, pv, adapter_ids=torch.tensor([0, 0], device=DEVICE))
    with pytest.raises(TypeError, match="adapter_ids"):
        prefix_attention(q, k, v, apk, apv, adapter_ids=torch.tensor([0.0, 1.0], device=DEVICE))


def test_forced_triton_refuses_huge_head_dim():
    (q, k, v, pk, pv), _ = make_inputs(B=1, Hq=1, Hkv=1, S=2, D=300, P=1)
    with use_backend("triton"), pytest.raises(RuntimeError, match="head_dim 300"):
        prefix_attention(q, k, v, pk, pv)


def test_tolerance_table_is_the_shared_one():
    assert set(TOLERANCES) == set(DTYPES)


# ------------------------------------------------------------------------------ GPU compiler (no GPU needed)

_COMPILE_SCRIPT = r"""
import torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import fastadapters.kernels.prefix_attention as K

TYPES = {torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64", torch.uint8: "*u8"}
B, Hq, Hkv, S, P, D = 2, 4, 2, 33, 5, 80
bf16 = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16)
q, k, pk = bf16(B, Hq, S, D), bf16(B, Hkv, S, D), bf16(1, Hkv, P, D)
lse, grad32 = torch.empty(B, Hq, S), torch.empty(1, Hkv, P, D)
mask, ids = torch.empty(B, S, dtype=torch.uint8), torch.empty(B, dtype=torch.int64)
ms = [mask.stride(0), 0, 0, mask.stride(1)]

def strides(*ts):
    return [s for x in ts for s in x.stride()]

seq = dict(MASK_KIND=1, CAUSAL=True)
launches = [
    (K._prefix_attention_fwd_kernel, "fwd", seq, [q, k, k, pk, pk, ids, mask, q, lse]
     + strides(q, k, k, pk, pk) + ms + strides(q) + [Hq, S, S, P, 2, 1, 0.1]),
    (K._prefix_attention_bwd_dq_kernel, "bwd", seq, [q, k, k, pk, pk, ids, mask, q, lse, lse, q]
     + strides(q, k, k, pk, pk) + ms + strides(q, q) + [Hq, S, S, P, 2, 1, 0.1]),
    (K._prefix_attention_bwd_kv_kernel, "bwd", dict(seq, IS_PREFIX=False),
     [q, k, k, ids, mask, q, lse, lse, k, k]
     + strides(q, k, k) + ms + strides(q, k, k) + [Hq, Hkv, S, S, 2, 1, 0.1]),
    (K._prefix_attention_bwd_kv_kernel, "bwd", dict(IS_PREFIX=True, MASK_KIND=0, CAUSAL=False),
     [q, pk, pk, ids, mask, q, lse, lse, grad32, grad32]
     + strides(q, pk, pk) + ms + strides(q, grad32, grad32) + [Hq, Hkv, S, P, 2, 1, 0.1]),
]
for fn, kind, const, args in launches:
    d_pad, bm, bn, warps, stages = K._config(D, kind)
    const = dict(const, D=D, D_PAD=d_pad, BLOCK_M=bm, BLOCK_N=bn, UPCAST=False, PER_ROW=True)
    const["IEEE"] = False
    sig, consts = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name], consts[(i,)] = "constexpr", const[name]
        elif isinstance(args[i], torch.Tensor):
            sig[name] = TYPES[args[i].dtype]
        else:
            integer = "i64" if name.startswith("stride") else "i32"
            sig[name] = "fp32" if isinstance(args[i], float) else integer
    options = dict(num_warps=warps, num_stages=stages)
    source = ASTSource(fn=fn, signature=sig, constexprs=consts)
    triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
print("compiled", len(launches))
"""


def test_kernels_compile_for_sm90():
    """The interpreter runs any Python; the real compiler is stricter (globals, loop types, constexpr).
    Compile every kernel (bf16, padded head dim 80) through ptxas for sm_90 (H100/H200), without a GPU."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0 and "compiled 4" in run.stdout, run.stderr[-3000:]
