"""Triton kernels, installed as fastadapters.kernels.

Under TRITON_INTERPRET=1 (set before triton is imported) they run on CPU tensors, which is how
the tests exercise them on machines without a GPU. bf16 arithmetic is wrong in the interpreter,
so kernels upcast bf16 tiles right after loading when INTERPRET is true.
"""

import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The bottleneck adapter's activations, in the order of their integer codes. The one table: the Triton
# kernels, the C++ (`Activation` in csrc/cpu/ops.h) and CUDA (csrc/cuda/launchers.h) enums and the torch
# backends all use this index; tests/test_extension.py checks the C++ enum against it.
ACTIVATIONS = ("tanh", "relu", "gelu", "silu", "sigmoid")

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    HAS_TRITON = False
