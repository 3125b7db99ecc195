"""kernels/_common.py, the Triton conventions the kernel files share: the host helpers, the autotune switch
reaching every autotuned kernel, the activation helper (f and f' by code, constexpr or per-program) against
torch, the dropout keep test, and every kernel compiled for sm_90 without a GPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastadapters import kernels

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from fastadapters.kernels import _common  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
interpreted = pytest.mark.skipif(not kernels.INTERPRET, reason="the helper kernels run on CPU tensors")

# torch's activation for each name, in no particular order: the test maps names to codes through the table.
TORCH_ACTIVATIONS = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "gelu": F.gelu,  # exact (erf), as the kernels
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
}


# --------------------------------------------------------------------------------------------- host side


def test_pow2_clamps_to_bounds():
    assert [_common.pow2(n, 16, 128) for n in (0, 1, 16, 17, 100, 128, 1000)] == [
        16,
        16,
        16,
        32,
        128,
        128,
        128,
    ]
    assert _common.pow2(300, 16) == 512 and _common.pow2(3) == 4
    assert _common.interp_block(33) == 64


def test_dtype_flags_follow_torch_fp32_precision():
    assert _common.dtype_flags(torch.float16) == {"UPCAST": False, "IEEE": False}
    assert _common.dtype_flags(torch.bfloat16) == {"UPCAST": kernels.INTERPRET, "IEEE": False}
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert _common.dtype_flags(torch.float32)["IEEE"] is True
        torch.set_float32_matmul_precision("high")  # the user allows tf32: the kernels may use it too
        assert _common.dtype_flags(torch.float32)["IEEE"] is False
    finally:
        torch.set_float32_matmul_precision(before)


def test_activation_code_is_the_table_index():
    assert [_common.activation_code(a) for a in kernels.ACTIVATIONS] == list(range(len(kernels.ACTIVATIONS)))
    with pytest.raises(ValueError, match="activation must be one of"):
        _common.activation_code("swish")


class _Recorder:
    """Stands in for a kernel: kernel[grid](*args, **kwargs) records the call."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.name, grid, args, kwargs))


class _Tuned(_Recorder):
    def __init__(self, calls):
        super().__init__("tuned", calls)
        self.fn = _Recorder("raw", calls)
        self.configs = [
            triton.Config({"BLOCK_M": 32}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 64}),
        ]


@pytest.mark.parametrize("interpret", [False, True])
@pytest.mark.parametrize("switch", [None, "1", "0"])
def test_launch_honours_the_autotune_switch(monkeypatch, interpret, switch):
    if switch is None:
        monkeypatch.delenv("FASTADAPTERS_AUTOTUNE", raising=False)
    else:
        monkeypatch.setenv("FASTADAPTERS_AUTOTUNE", switch)
    monkeypatch.setattr(_common, "INTERPRET", interpret)
    calls = []
    _common.launch(_Tuned(calls), (3,), (1, 2), {"ACT": 0}, {"BLOCK_M": 128})
    [(name, grid, args, kwargs)] = calls
    assert grid == (3,) and args == (1, 2)
    if interpret:  # the interpreter cannot time configs: the raw kernel, the interpreter's blocks
        assert (name, kwargs) == ("raw", {"ACT": 0, "BLOCK_M": 128, "num_warps": 4})
    elif switch == "0":  # the first config, untimed
        assert (name, kwargs) == ("raw", {"ACT": 0, "BLOCK_M": 32, "num_warps": 8, "num_stages": 2})
    else:
        assert (name, kwargs) == ("tuned", {"ACT": 0})


def test_every_autotuned_kernel_launches_through_launch():
    """FASTADAPTERS_AUTOTUNE=0 reaches a kernel only through _common.launch: no @triton.autotune decorator,
    no direct `<tuned>[grid]` call in the kernel files."""
    for path in sorted((ROOT / "kernels").glob("*.py")):
        text = path.read_text()
        assert "@triton.autotune" not in text, (
            f"{path.name}: decorate with triton.autotune(...)(fn), then launch()"
        )
        tuned = re.findall(r"^(\w+) = triton\.autotune\(", text, flags=re.M)
        for name in tuned:
            assert not re.search(rf"\b{name}\[", text), f"{path.name}: {name} launched without _common.launch"
            assert re.search(rf"\blaunch\({name},", text), f"{path.name}: {name} is never launched"


# --------------------------------------------------------------------------------------------- device side


@triton.jit
def _activation_kernel(z_ptr, codes_ptr, f_ptr, df_ptr, N, CODE: tl.constexpr, RUNTIME: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    z = tl.load(z_ptr + row * N + offs, mask=offs < N, other=0.0)
    if RUNTIME:  # a per-program value, as the multi-adapter kernels pass it
        f, df = _common.activation(z, tl.load(codes_ptr + row))
    else:
        f, df = _common.activation(z, CODE)
    tl.store(f_ptr + row * N + offs, f, mask=offs < N)
    tl.store(df_ptr + row * N + offs, df, mask=offs < N)


@interpreted
@pytest.mark.parametrize("runtime", [False, True], ids=["constexpr-code", "runtime-code"])
def test_activation_matches_torch(runtime):
    names = kernels.ACTIVATIONS
    n = 37
    z = torch.linspace(-6.0, 6.0, n).repeat(len(names), 1)
    z[:, n // 2] = 0.0  # relu'(0) = 0, as torch
    codes = torch.arange(len(names), dtype=torch.int32)
    f, df = torch.empty_like(z), torch.empty_like(z)
    if runtime:
        _activation_kernel[(len(names),)](z, codes, f, df, n, CODE=0, RUNTIME=True, BLOCK=64)
    for code, name in enumerate(names):
        if not runtime:
            row = slice(code, code + 1)
            _activation_kernel[(1,)](z[row], codes, f[row], df[row], n, CODE=code, RUNTIME=False, BLOCK=64)
        zr = z[code].clone().requires_grad_(True)
        expected = TORCH_ACTIVATIONS[name](zr)
        expected.sum().backward()
        torch.testing.assert_close(f[code], expected.detach(), atol=2e-6, rtol=1e-5, msg=f"{name} f")
        torch.testing.assert_close(df[code], zr.grad, atol=2e-6, rtol=1e-5, msg=f"{name} f'")


@triton.jit
def _keep_kernel(flat_ptr, tile_ptr, seed, p, ROWS: tl.constexpr, COLS: tl.constexpr, WIDE: tl.constexpr):
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    idx = rows[:, None] * COLS + cols[None, :]
    tl.store(flat_ptr + idx, _common.keep(seed, idx.to(tl.int64), p, WIDE).to(tl.int8))
    tl.store(tile_ptr + idx, _common.keep_2d(seed, rows, cols, COLS, p, WIDE).to(tl.int8))


@interpreted
@pytest.mark.parametrize("wide", [False, True])
def test_keep_2d_is_keep_of_the_row_major_index(wide):
    """Every kernel's dropout mask is keep(seed, row · row_len + col): the tile helper agrees with the flat
    test, the same seed gives the same mask, and about 1 - p of the elements are kept."""
    masks = []
    for seed in (5, 5, 6):
        flat, tile = torch.empty(64, 128, dtype=torch.int8), torch.empty(64, 128, dtype=torch.int8)
        _keep_kernel[(1,)](flat, tile, seed, 0.25, ROWS=64, COLS=128, WIDE=wide)
        assert torch.equal(flat, tile)
        masks.append(flat)
    assert torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert abs(masks[0].float().mean().item() - 0.75) < 0.03


# --------------------------------------------------------------------------------------------- GPU compiler


def test_every_kernel_compiles_for_sm90():
    """The interpreter runs any Python; the compiler is stricter (constexpr use, loop-carried and helper
    argument types). tests/compile_kernels.py --quick compiles every kernel of the four files, each
    constexpr branch at least once, through ptxas for sm_90 (H100/H200), without a GPU."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "compile_kernels.py"), "--quick"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    names = set(re.findall(r"^(_\w+_kernel) ", run.stdout, flags=re.M))
    defined = set()
    for path in (ROOT / "kernels").glob("*.py"):
        defined |= set(re.findall(r"^def (_\w+_kernel)\(", path.read_text(), flags=re.M))
    assert defined and names == defined, f"not compiled: {sorted(defined - names)}\n{run.stdout[-2000:]}"
