"""Loads the optional compiled extension fastadapters._C once.

If it is missing or failed to build, one warning says how to build it (or silence it with
FASTADAPTERS_SKIP_EXT=1) and where the build log is; the ops then run on their other backends.
FASTADAPTERS_DISABLE_EXT=1 does not even try to load it (to test the pure-Python path, or to rule the
extension out when debugging).
"""

import os
import warnings

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOG = os.path.join(_ROOT, "build", "fastadapters_ext.log")

AVAILABLE = False
ERROR: str | None = None

if os.environ.get("FASTADAPTERS_DISABLE_EXT") == "1":
    ERROR = "disabled by FASTADAPTERS_DISABLE_EXT=1"
else:
    try:
        import torch  # noqa: F401  (first: _C links against libc10/libtorch, which torch loads)

        from fastadapters import _C  # noqa: F401  (loading it registers torch.ops.fastadapters_C)

        AVAILABLE = True
    except ImportError as exc:  # pragma: no cover - depends on the build
        ERROR = str(exc)

if not AVAILABLE and os.environ.get("FASTADAPTERS_SKIP_EXT") != "1":
    warnings.warn(
        "fastadapters._C (the compiled CPU/CUDA kernels) is not available; ops use their Triton and "
        f"torch backends. Rebuild with `pip install -e . --no-build-isolation` (build log: {_LOG}), "
        f"or set FASTADAPTERS_SKIP_EXT=1 to silence this. Reason: {ERROR}",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cuda() -> bool:
    """True when the extension was built with its CUDA kernels."""
    return AVAILABLE and bool(getattr(_C, "WITH_CUDA", 0))


def has_op(name: str) -> bool:
    """Whether the extension provides the op `name` (torch.ops.fastadapters_C.<name>, e.g.
    "bottleneck_forward"); False when fastadapters._C is not loaded."""
    import torch

    return AVAILABLE and hasattr(torch.ops.fastadapters_C, name)
