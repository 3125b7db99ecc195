"""Triton kernels, installed as fastadapters.kernels.

Under TRITON_INTERPRET=1 (set before triton is imported) they run on CPU tensors, which is how
the tests exercise them on machines without a GPU. bf16 arithmetic is wrong in the interpreter,
so kernels upcast bf16 tiles right after loading when INTERPRET is true.
"""

import importlib.util
import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# The bottleneck adapter's activations, in the order of their integer codes. The one table: the Triton
# kernels, the torch backends and the C++/CUDA list (csrc/activations.h) all use this index;
# tests/test_extension.py checks the C++ list against it.
ACTIVATIONS = ("tanh", "relu", "gelu", "silu", "sigmoid")

# Found, not imported: `import fastadapters` must not import triton (the kernels import it when first used).
HAS_TRITON = importlib.util.find_spec("triton") is not None
