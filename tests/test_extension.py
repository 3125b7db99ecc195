"""The compiled extension fastadapters._C: its CPU kernels against fastadapters.reference under the forced
"cpu" backend (tolerance table, odd shapes, dropout from the seed, hypothesis), its C-level checks, the
optional build (one warning, a clear error when forced), and the CUDA sources (nvcc -c for sm_80/sm_90,
and a syntax check of the CUDA half of csrc/bindings.cpp)."""

import math
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import TOLERANCES, assert_close
from fastadapters.kernels import ACTIVATIONS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastadapters import _ext, ops, reference
from fastadapters.ops import bottleneck as bn_ops
from fastadapters.ops import lora as lora_ops
from fastadapters.ops import multi_lora as ml_ops

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

needs_ext = pytest.mark.skipif(not _ext.AVAILABLE, reason=f"fastadapters._C is not built: {_ext.ERROR}")


def dy_like(y):
    """An upstream gradient scaled like a mean-reduced loss's, so token-summed weight gradients stay O(1)."""
    rows = max(1, y.numel() // max(1, y.shape[-1]))
    return (torch.randn(y.shape) / math.sqrt(rows)).to(y.dtype)


def leaf(*shape, dtype, scale=1.0, grad=True):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_(grad)


def f32(t):
    return None if t is None else t.detach().float().requires_grad_(t.requires_grad)


# --------------------------------------------------------------------------------------------- LoRA


def run_lora(dtype, n, d_in, d_outs, ranks, dropout_p, *, strided=False, bias=True):
    """The grouped LoRA op on the cpu backend against the reference with the backend's own dropout mask."""
    x_full = leaf(n, 2 * d_in if strided else d_in, dtype=dtype)
    x = x_full[:, ::2] if strided else x_full  # non-contiguous rows: stride 2 along d_in
    ws = [leaf(d, d_in, dtype=dtype, scale=d_in**-0.5, grad=False) for d in d_outs]
    bs = [leaf(d, dtype=dtype, grad=False) if bias else None for d in d_outs]
    As = [leaf(r, d_in, dtype=dtype, scale=d_in**-0.5) for r in ranks]
    Bs = [leaf(d, r, dtype=dtype, scale=r**-0.5) for d, r in zip(d_outs, ranks)]
    scales = [0.5 + i for i in range(len(ranks))]
    torch.manual_seed(7)
    with ops.use_backend("cpu"):
        ys = ops.lora_linear_grouped(x, ws, bs, As, Bs, scales, dropout_p=dropout_p, training=True)
    dys = [dy_like(y) for y in ys]
    torch.autograd.backward(ys, dys)
    mask = None
    if dropout_p > 0:
        torch.manual_seed(7)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        with ops.use_backend("cpu"):
            keep = ops.lora_dropout_mask((n, d_in), dropout_p, seed, "cpu")
        mask = keep.float() / (1 - dropout_p)
    xr = f32(x_full)
    x_ref = xr[:, ::2] if strided else xr
    for i, (y, dy) in enumerate(zip(ys, dys)):
        Ar, Br = f32(As[i]), f32(Bs[i])
        yr = reference.lora_linear(x_ref, ws[i].float(), f32(bs[i]), Ar, Br, scales[i], mask)
        yr.backward(dy.float())
        assert_close(y, yr, dtype, f"y[{i}]")
        assert_close(As[i].grad, Ar.grad, dtype, f"dA[{i}]")
        assert_close(Bs[i].grad, Br.grad, dtype, f"dB[{i}]")
    assert_close(x_full.grad, xr.grad, dtype, "dx")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "n, d_in, d_outs, ranks, dropout_p",
    [
        (1, 7, [5], [1], 0.0),
        (97, 130, [33], [7], 0.1),
        (130, 64, [96, 32, 32], [16, 16, 16], 0.05),  # grouped q/k/v
        (33, 17, [130], [130], 0.0),  # rank > d_in, rank not a multiple of 8
    ],
)
def test_lora_cpu_matches_reference(dtype, n, d_in, d_outs, ranks, dropout_p):
    run_lora(dtype, n, d_in, d_outs, ranks, dropout_p)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_cpu_strided_x_no_bias(dtype):
    run_lora(dtype, 45, 24, [19], [5], 0.2, strided=True, bias=False)


@needs_ext
def test_lora_cpu_empty_batch():
    x = torch.randn(0, 16, requires_grad=True)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(8, 4, requires_grad=True)
    with ops.use_backend("cpu"):
        y = ops.lora_linear(x, torch.randn(8, 16), None, a, b, 2.0, 0.1, training=True)
        y.sum().backward()
    assert y.shape == (0, 8) and torch.count_nonzero(a.grad) == 0 and torch.count_nonzero(b.grad) == 0


@needs_ext
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 70),
    d_in=st.integers(1, 90),
    d_out=st.integers(1, 90),
    rank=st.integers(1, 40),
    dropout_p=st.sampled_from([0.0, 0.3]),
    dtype=st.sampled_from(DTYPES),
)
def test_lora_cpu_hypothesis(n, d_in, d_out, rank, dropout_p, dtype):
    run_lora(dtype, n, d_in, [d_out], [rank], dropout_p)


@needs_ext
def test_dropout_mask_is_reproducible_and_has_rate_p():
    mask = lora_ops.BACKENDS["cpu"].module().dropout_mask
    a, b = mask((301, 257), 0.3, 11, "cpu"), mask((301, 257), 0.3, 11, "cpu")
    c = mask((301, 257), 0.3, 12, "cpu")
    assert a.dtype == torch.bool and torch.equal(a, b) and not torch.equal(a, c)
    n = a.numel()
    keep = a.float().mean().item()
    assert abs(keep - 0.7) < 4 * math.sqrt(0.3 * 0.7 / n), f"keep rate {keep} for p = 0.3"
    # Rows and columns are independent draws: no row or column is all-kept or all-dropped by construction.
    assert 0.5 < a.float().mean(0).min() and a.float().mean(0).max() < 0.9
    assert torch.equal(mask((4, 5), 0.0, 11, "cpu"), torch.ones(4, 5, dtype=torch.bool))


@needs_ext
def test_cpu_lora_saves_only_x_and_t():
    x = torch.randn(64, 32, requires_grad=True)
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(16, 4, requires_grad=True)
    w = torch.randn(16, 32)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with ops.use_backend("cpu"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.lora_linear(x, w, None, a, b, 1.0, 0.1, training=True)
    assert (64, 32) in saved and (64, 4) in saved
    assert sorted(saved).count((64, 32)) == 1, f"a dropout copy of x was saved: {saved}"


@needs_ext
def test_c_level_checks_name_the_argument():
    C = torch.ops.fastadapters_C
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    with pytest.raises(RuntimeError, match=r"lora_as\[0\] must have shape \[3, 8\]"):
        C.lora_forward(x, [w], [None], [torch.randn(3, 9)], [torch.randn(6, 3)], [1.0], 0.0, -1)
    with pytest.raises(RuntimeError, match="must be float32, float16 or bfloat16"):
        C.lora_forward(
            x.double(), [w.double()], [None], [torch.randn(3, 8)], [torch.randn(6, 3)], [1.0], 0.0, -1
        )
    with pytest.raises(RuntimeError, match="dropout_p must be in"):
        C.dropout_mask([3, 3], 1.5, 1)


# --------------------------------------------------------------------------------------------- multi-LoRA


def make_bank(d_in, d_outs, ranks, dtype):
    """bank_a / bank_bs in the layout of fastadapters/ops/multi_lora.py for member-major ranks[m][a]."""
    n = len(ranks[0])
    rows = sum(ranks[m][a] for a in range(n) for m in range(len(ranks)))
    bank_a = (torch.randn(rows, d_in) / math.sqrt(d_in)).to(dtype)
    bank_bs = [(torch.randn(sum(r), d) / math.sqrt(max(1, max(r)))).to(dtype) for r, d in zip(ranks, d_outs)]
    return bank_a, bank_bs


def spread_ids(spread, n_tok, n, gen):
    """[n_tok] adapter ids in 0..n-1 or -1 (no adapter): distinct (interleaved), zipf, sorted or all_base."""
    if spread == "distinct":
        return torch.arange(n_tok) % (n + 1) - 1
    if spread == "zipf":
        return torch.multinomial(1.0 / torch.arange(1, n + 2), n_tok, replacement=True, generator=gen) - 1
    if spread == "sorted":
        return torch.randint(-1, n, (n_tok,), generator=gen).sort().values
    return torch.full((n_tok,), -1)


def check_multi_lora(backend, dtype, label, x, ws, bs, bank_a, bank_bs, ranks, scales, ids):
    """The grouped multi-LoRA op on `backend` against the reference, member by member."""
    with ops.use_backend(backend), torch.no_grad():
        ys = ml_ops.multi_lora_linear_grouped(x, ws, bs, bank_a, bank_bs, ranks, scales, ids)
    refs = reference.multi_lora_linear_grouped(x, ws, bs, bank_a, bank_bs, ranks, scales, ids)
    for m, (y, r) in enumerate(zip(ys, refs)):
        assert_close(y, r, dtype, f"y[{m}] ({label})")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spread", ["distinct", "zipf", "sorted", "all_base"])
def test_multi_lora_cpu_matches_reference(dtype, spread):
    n_tok, d_in, d_outs = 67, 40, [24, 9]
    ranks = [[1, 8, 0, 16, 7], [3, 0, 2, 64, 1]]  # mixed ranks, some adapters without a member's LoRA
    n = len(ranks[0])
    x = torch.randn(n_tok, d_in).to(dtype)
    ws = [(torch.randn(d, d_in) / math.sqrt(d_in)).to(dtype) for d in d_outs]
    bs = [torch.randn(d_outs[0]).to(dtype), None]
    bank_a, bank_bs = make_bank(d_in, d_outs, ranks, dtype)
    scales = [[0.5 * (a + 1) for a in range(n)], [2.0] * n]
    ids = spread_ids(spread, n_tok, n, torch.Generator().manual_seed(3))
    check_multi_lora("cpu", dtype, spread, x, ws, bs, bank_a, bank_bs, ranks, scales, ids)


@needs_ext
def test_multi_lora_cpu_empty_and_3d():
    x = torch.randn(2, 0, 16)
    ids = torch.zeros(2, 0, dtype=torch.long)
    bank_a, bank_bs = make_bank(16, [8], [[4]], torch.float32)
    with ops.use_backend("cpu"), torch.no_grad():
        y = ml_ops.multi_lora_linear(x, torch.randn(8, 16), None, bank_a, bank_bs[0], [4], [1.0], ids)
    assert y.shape == (2, 0, 8)


# --------------------------------------------------------------------------------------------- bottleneck


def check_bottleneck(dtype, activation, out, grad, h, down, up, scale, keep, p):
    """out and the gradients out.backward(grad) left on h, down, up (and a tensor scale) against the fp32
    reference with the backend's keep mask."""
    hr, dr, ur = f32(h), f32(down), f32(up)
    sr = f32(scale) if isinstance(scale, torch.Tensor) else scale
    ref = reference.bottleneck_adapter(hr, dr, ur, sr, activation, dropout_mask=keep.float() / (1 - p))
    ref.backward(grad.float())
    assert_close(out, ref, dtype, "out")
    for name, got, want in [
        ("dh", h.grad, hr.grad),
        ("d_down", down.grad, dr.grad),
        ("d_up", up.grad, ur.grad),
    ]:
        assert_close(got, want, dtype, name)
    if isinstance(scale, torch.Tensor):
        assert_close(scale.grad, sr.grad, dtype, "d_scale")


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", bn_ops.ACTIVATIONS)
def test_bottleneck_cpu_matches_reference(dtype, activation):
    n, d, b = 97, 40, 7
    h = leaf(n, d, dtype=dtype)
    down = leaf(b, d, dtype=dtype, scale=d**-0.5)
    up = leaf(d, b, dtype=dtype, scale=b**-0.5)
    scale = torch.tensor(0.7, dtype=dtype, requires_grad=True) if activation == "gelu" else 1.5
    torch.manual_seed(5)
    with ops.use_backend("cpu"):
        out = ops.bottleneck_adapter(h, down, up, scale, activation, dropout_p=0.1, training=True)
    grad = dy_like(out)
    out.backward(grad)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    with ops.use_backend("cpu"):
        keep = bn_ops.bottleneck_dropout_mask((n, d), 0.1, seed, "cpu")
    check_bottleneck(dtype, activation, out, grad, h, down, up, scale, keep, 0.1)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bottleneck_cpu_parallel_form(dtype):
    n, d_in, d_out, b = 65, 24, 31, 130  # bottleneck wider than d_in
    h, down, up = (
        leaf(n, d_in, dtype=dtype),
        leaf(b, d_in, dtype=dtype, scale=0.2),
        leaf(d_out, b, dtype=dtype),
    )
    res = leaf(n, d_out, dtype=dtype)
    with ops.use_backend("cpu"):
        out = ops.bottleneck_adapter(h, down, up, 0.3, "relu", residual=res)
    grad = dy_like(out)
    out.backward(grad)
    hr, dr, ur, rr = f32(h), f32(down), f32(up), f32(res)
    ref = reference.bottleneck_adapter(hr, dr, ur, 0.3, "relu", residual=rr)
    ref.backward(grad.float())
    assert_close(out, ref, dtype, "out")
    for name, got, want in [("dh", h.grad, hr.grad), ("dres", res.grad, rr.grad), ("d_up", up.grad, ur.grad)]:
        assert_close(got, want, dtype, name)


# ------------------------------------------------------------------------------------------- dispatch, build


@needs_ext
def test_cpu_backends_registered():
    for op_backends in (lora_ops.BACKENDS, bn_ops.BACKENDS, ml_ops.BACKENDS):
        assert op_backends["cpu"].module() is not None
        assert "cuda" not in op_backends or op_backends["cuda"].reasons(device=torch.device("cpu"))


def test_dispatch_prefers_cpu_only_where_measured_faster():
    """The priority rules: on CPU tensors the C++ LoRA backend first; the C++ bottleneck backend only with
    dropout (torch's GEMMs win without it), though it can run either call and is taken when forced."""
    lora_choice = ops.backend_for("lora_linear", "cpu", torch.float32)
    assert lora_choice == ("cpu" if _ext.AVAILABLE else "torch")
    assert ops.backend_for("bottleneck_adapter", "cpu", bottleneck=8, dropout_p=0.0) == "torch"
    why = bn_ops.BACKENDS["cpu"].reasons(device=torch.device("cpu"), dtype=torch.float32, bottleneck=8)
    if _ext.AVAILABLE:
        assert why == []  # a backend says only whether it can run a call, never whether it is faster
        assert ops.backend_for("bottleneck_adapter", "cpu", bottleneck=8, dropout_p=0.1) == "cpu"
        with ops.use_backend("cpu"):
            assert ops.backend_for("bottleneck_adapter", "cpu", bottleneck=8, dropout_p=0.0) == "cpu"


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTADAPTERS_")}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-W", "always::RuntimeWarning", "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=300,
    )  # fmt: skip


def test_without_extension_one_warning_then_other_backends_and_clear_forced_error():
    code = """
        import importlib, os, warnings, torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import fastadapters
            from fastadapters import _ext, ops
            import fastadapters._ext  # a second import must not warn again
        ours = [w for w in caught if "fastadapters._C" in str(w.message)]
        print("WARNINGS", len(ours))
        for w in ours:
            print("MESSAGE", w.message)
        x, w, a, b = torch.randn(5, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        print("OUT", tuple(ops.lora_linear(x, w, None, a, b, 1.0).shape))
        with ops.use_backend("cpu"):
            try:
                ops.lora_linear(x, w, None, a, b, 1.0)
            except RuntimeError as e:
                print("FORCED", e)
        os.environ["FASTADAPTERS_SKIP_EXT"] = "1"  # the documented way to silence the warning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            importlib.reload(_ext)
        print("SILENCED", len([w for w in caught if "fastadapters._C" in str(w.message)]))
    """
    res = run_python(code, FASTADAPTERS_DISABLE_EXT="1")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "WARNINGS 1" in out, out
    assert "FASTADAPTERS_SKIP_EXT" in out and "fastadapters_ext.log" in out, out
    assert "OUT (5, 4)" in out, out
    assert (
        "FORCED lora_linear: FASTADAPTERS_BACKEND=cpu cannot run this call" in out and "not built" in out
    ), out
    assert "SILENCED 0" in out, out


def test_sources_use_light_headers():
    """The build stays short: no torch/torch.h or torch/extension.h; only bindings.cpp includes torch."""
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix not in (".cpp", ".h", ".cu", ".cuh"):
            continue
        text = path.read_text()
        assert "torch/torch.h" not in text and "torch/extension.h" not in text, path
        if path.name != "bindings.cpp":
            for header in ("<torch/", "<ATen/", "<c10/", "pybind11"):
                assert header not in text, (
                    f"{path} includes {header}: only csrc/bindings.cpp may include torch"
                )


CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc")


# Compile-only checks for machines without a GPU (CI); where a GPU is present the real build has compiled
# everything already, and its time budget is better spent on the kernels' own tests.
compile_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU build compiled the sources already"
)


@compile_only
@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_every_cu_compiles_for_sm80_and_sm90(tmp_path):
    assert CUDA_SOURCES, "csrc/cuda has no .cu file"
    archs = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]

    def compile_one(src):
        # The half/bfloat16 guards torch's CUDAExtension adds: the kernels must convert explicitly.
        guards = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__"]
        guards += ["-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
        out = str(tmp_path / (src.stem + ".o"))
        cmd = [
            NVCC,
            "-c",
            "-O1",
            "-std=c++17",
            "--expt-relaxed-constexpr",
            *guards,
            *archs,
            str(src),
            "-o",
            out,
        ]
        return src, subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for src, res in pool.map(compile_one, CUDA_SOURCES):
            assert res.returncode == 0, f"nvcc failed on {src.name}:\n{res.stderr[-4000:]}"


def _cuda_include() -> Path | None:
    if NVCC is None:
        return None
    home = Path(os.environ.get("CUDA_HOME", Path(NVCC).resolve().parents[1]))
    for candidate in (home / "include", Path("/usr/local/cuda/include")):
        if (candidate / "cuda_runtime_api.h").exists():
            return candidate
    return None


@compile_only
@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA toolkit headers")
@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
def test_bindings_cuda_half_compiles(tmp_path):
    """Syntax-checks csrc/bindings.cpp with FASTADAPTERS_WITH_CUDA against this (CPU) torch's headers.

    The CPU wheel lacks one generated c10/cuda header; a stub stands in for it (it only holds build macros).
    """
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{tmp_path}", f"-I{_cuda_include()}"]
    cmd = [
        "g++", "-std=c++20", "-fsyntax-only", "-fopenmp", "-Wno-psabi", "-DFASTADAPTERS_WITH_CUDA",
        *incs, f"-I{sysconfig.get_paths()['include']}", str(ROOT / "csrc" / "bindings.cpp"),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]


def test_activation_codes_are_the_one_table():
    """The C++ and CUDA enums derive from csrc/activations.h, which lists fastadapters.kernels.ACTIVATIONS
    in code order; the built extension exposes the list it was compiled with."""
    header = (ROOT / "csrc" / "activations.h").read_text()
    body = re.search(r"#define FA_ACTIVATIONS\(X\)(.*)", header).group(1)
    pairs = re.findall(r"X\((\w+), (\w+)\)", body)
    assert [lower for _, lower in pairs] == list(ACTIVATIONS)
    assert all(upper == lower.upper() for upper, lower in pairs)
    for header in ("cpu/ops.h", "cuda/launchers.h"):
        assert "FA_ACTIVATIONS(" in (ROOT / "csrc" / header).read_text(), f"{header} does not use the list"
    if _ext.AVAILABLE:
        from fastadapters import _C

        assert _C.ACTIVATIONS == ACTIVATIONS


@needs_ext
def test_bad_activation_code_names_the_table():
    h, down, up = torch.randn(3, 8), torch.randn(2, 8), torch.randn(8, 2)
    names = ", ".join(ACTIVATIONS)
    expected = re.escape(
        f"activation must be a code 0..{len(ACTIVATIONS) - 1} ({names}), got {len(ACTIVATIONS)}"
    )
    with pytest.raises(RuntimeError, match=expected):
        torch.ops.fastadapters_C.bottleneck_forward(h, down, up, None, 1.0, len(ACTIVATIONS), 0.0, 0, None)


def test_has_op_names_registered_ops_only():
    assert _ext.has_op("bottleneck_forward") == _ext.AVAILABLE
    assert _ext.has_op("lora_backward") == _ext.AVAILABLE
    assert not _ext.has_op("no_such_op")


def test_tolerance_table_is_the_shared_one():
    assert set(TOLERANCES) == set(DTYPES)


# --------------------------------------------------------------------------------------------- CUDA kernels
# Run where torch has a GPU and fastadapters._C was built with its CUDA kernels (bench/gpu_check.sh).

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda()),
    reason="needs a GPU and fastadapters._C built with CUDA",
)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ["decode", "prefill"])
def test_multi_lora_cuda_matches_reference(dtype, shape):
    dev = torch.device("cuda")
    ranks = [[1, 8, 0, 16, 64], [3, 0, 2, 64, 1], [16, 16, 16, 16, 16]]  # q, k, v members, mixed ranks
    n = len(ranks[0])
    n_tok, d_in, d_outs = (37, 200, [200, 64, 64]) if shape == "decode" else (1031, 136, [136, 40, 40])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_tok, d_in, generator=gen).to(dev, dtype)
    ws = [(torch.randn(d, d_in, generator=gen) / math.sqrt(d_in)).to(dev, dtype) for d in d_outs]
    bs = [torch.randn(d_outs[0], generator=gen).to(dev, dtype), None, None]
    bank_a, bank_bs = make_bank(d_in, d_outs, ranks, dtype)
    bank_a, bank_bs = bank_a.to(dev), [b.to(dev) for b in bank_bs]
    scales = [[0.5 * (a + 1) for a in range(n)] for _ in ranks]
    # decode: one token per request, adapters interleaved; prefill: segments of unequal length
    ids = spread_ids("distinct" if shape == "decode" else "sorted", n_tok, n, gen).to(dev)
    check_multi_lora("cuda", dtype, shape, x, ws, bs, bank_a, bank_bs, ranks, scales, ids)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [5, 64, 301])  # the fused small-batch launches (<= 64 rows) and the cuBLAS path
@pytest.mark.parametrize("activation", ["tanh", "gelu", "silu"])
def test_bottleneck_cuda_matches_reference(dtype, n, activation):
    dev = torch.device("cuda")
    d, b, p = 96, 40, 0.1
    gen = torch.Generator().manual_seed(1)

    def cuda_leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dev, dtype).requires_grad_(True)

    h, down, up = cuda_leaf(n, d), cuda_leaf(b, d, scale=d**-0.5), cuda_leaf(d, b, scale=b**-0.5)
    scale = torch.tensor(0.7, device=dev, dtype=dtype, requires_grad=True)
    torch.manual_seed(5)
    with ops.use_backend("cuda"):
        out = ops.bottleneck_adapter(h, down, up, scale, activation, dropout_p=p, training=True)
    grad = (torch.randn(out.shape, generator=gen) / math.sqrt(n)).to(dev, dtype)
    out.backward(grad)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    # The CPU kernels' mask: the CUDA kernels must draw the very same bits (csrc/dropout_hash.h).
    keep = torch.ops.fastadapters_C.dropout_mask([n, d], p, seed).to(dev)
    check_bottleneck(dtype, activation, out, grad, h, down, up, scale, keep, p)


@needs_cuda
def test_bottleneck_cuda_parallel_form_small_and_large():
    dev = torch.device("cuda")
    for n in (3, 200):
        h, down, up = (
            torch.randn(n, 24, device=dev),
            torch.randn(130, 24, device=dev) * 0.2,
            torch.randn(31, 130, device=dev),
        )
        res = torch.randn(n, 31, device=dev)
        with ops.use_backend("cuda"), torch.no_grad():
            out = ops.bottleneck_adapter(h, down, up, 0.3, "relu", residual=res)
        assert_close(
            out, reference.bottleneck_adapter(h, down, up, 0.3, "relu", residual=res), torch.float32, "out"
        )
