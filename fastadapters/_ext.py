"""Loads the optional compiled extension fastadapters._C once.

If it is missing or failed to build, one warning says how to build it (or silence it with
FASTADAPTERS_SKIP_EXT=1) and where the build log is; the ops then run on their other backends.
"""

import os
import warnings

_LOG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "fastadapters_ext.log")

try:
    from fastadapters import _C  # noqa: F401  (loading it registers torch.ops.fastadapters_C)

    AVAILABLE = True
    ERROR = None
except ImportError as exc:  # pragma: no cover - depends on the build
    AVAILABLE = False
    ERROR = str(exc)
    if os.environ.get("FASTADAPTERS_SKIP_EXT") != "1":
        warnings.warn(
            "fastadapters._C (the compiled CPU/CUDA kernels) is not available; ops use their Triton and "
            f"torch backends. Rebuild with `pip install -e . --no-build-isolation` (build log: {_LOG}), "
            f"or set FASTADAPTERS_SKIP_EXT=1 to silence this. Import error: {exc}",
            RuntimeWarning,
            stacklevel=2,
        )


def has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    import torch

    return AVAILABLE and hasattr(torch.ops.fastadapters_C, "multi_lora_shrink_cuda")
