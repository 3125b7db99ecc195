"""Test setup: Triton runs in its interpreter on the CPU, so TRITON_INTERPRET must be set before any
module imports triton. Shared tolerances and tiny random models live here."""

import os

# FASTADAPTERS_TEST_DEVICE=cuda (bench/gpu_check.sh) runs the suite on a GPU with compiled Triton
# kernels: the interpreter stays off, and the `device` fixture gives tests the device to build inputs on.
TEST_DEVICE = os.environ.get("FASTADAPTERS_TEST_DEVICE", "cpu")
if TEST_DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck  # noqa: E402

# One per-dtype tolerance table for every op test: (atol, rtol) against the fp32 reference.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
}


# Settings of the op tests' random-shape (hypothesis) sweeps: reproducible, no per-example deadline.
HYPOTHESIS = dict(
    deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def assert_close(actual, expected, dtype=None, name="output"):
    """assert_close with the table's tolerance for `dtype` (default: expected's dtype)."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name} mismatch: {m}"
    )


# The device op tests build their inputs on (module level, for parametrising by what a backend can run):
# cpu, or FASTADAPTERS_TEST_DEVICE (cuda on a GPU machine). Tests taking the `device` fixture get the same.
DEVICE = torch.device(TEST_DEVICE)


@pytest.fixture
def device() -> torch.device:
    """The device tests build their inputs on: cpu, or FASTADAPTERS_TEST_DEVICE (cuda on a GPU machine)."""
    if TEST_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("FASTADAPTERS_TEST_DEVICE=cuda but CUDA is not available")
    return DEVICE


def skip_module_without_device():
    """Skips the calling test module when FASTADAPTERS_TEST_DEVICE=cuda but CUDA is not available."""
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("FASTADAPTERS_TEST_DEVICE=cuda but CUDA is not available", allow_module_level=True)


def op_seed(torch_seed: int) -> int:
    """The dropout seed an op draws right after torch.manual_seed(torch_seed)."""
    from fastadapters.ops import _checks

    torch.manual_seed(torch_seed)
    return int(_checks.new_seed())


def reference_mask(dropout_mask, backend: str, shape, dropout_p: float, seed: int) -> torch.Tensor:
    """The keep mask `backend` draws (dropout_mask: ops.lora_dropout_mask or ops.bottleneck_dropout_mask) as
    the reference's multiplier keep / (1 - p)."""
    from fastadapters import ops

    with ops.use_backend(backend):
        keep = dropout_mask(shape, dropout_p, seed, DEVICE)
    assert keep.dtype == torch.bool and tuple(keep.shape) == tuple(shape)
    return keep.float() / (1.0 - dropout_p)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is as fast, and avoids oversubscribing a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
