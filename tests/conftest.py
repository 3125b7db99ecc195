"""Test setup: Triton runs in its interpreter on the CPU, so TRITON_INTERPRET must be set before any
module imports triton. Shared tolerances and tiny random models live here."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One per-dtype tolerance table for every op test: (atol, rtol) against the fp32 reference.
TOLERANCES = {
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
}


def assert_close(actual, expected, dtype=None, name="output"):
    """assert_close with the table's tolerance for `dtype` (default: expected's dtype)."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{name} mismatch: {m}"
    )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
