"""fastadapters: fused kernels for adapter fine-tuning and multi-adapter serving of LLMs."""

from fastadapters import (
    _ext,  # noqa: F401  (loads the compiled extension once, or warns once)
    ops,
    reference,
)
from fastadapters.bank import AdapterBank
from fastadapters.config import (
    BottleneckConfig,
    LoraConfig,
    PrefixConfig,
    PromptTuningConfig,
    PTuningConfig,
)
from fastadapters.io import load, load_peft, save, save_peft
from fastadapters.patch import apply, merge, remove, trainable_parameters, unmerge
from fastadapters.prefix import fold_prefix

__version__ = "0.1.0"  # the one version: pyproject.toml reads this line (statically, at build time)

_LAZY = {"accelerate": "peft_accel", "deaccelerate": "peft_accel", "AccelerateCallback": "peft_accel"}


def __getattr__(name):
    # PEFT acceleration imports peft; load it only when asked for.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"fastadapters.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fastadapters' has no attribute {name!r}")


__all__ = [
    "LoraConfig",
    "BottleneckConfig",
    "PrefixConfig",
    "PromptTuningConfig",
    "PTuningConfig",
    "fold_prefix",
    "AdapterBank",
    "apply",
    "remove",
    "merge",
    "unmerge",
    "trainable_parameters",
    "save",
    "load",
    "save_peft",
    "load_peft",
    "ops",
    "reference",
    "accelerate",
    "deaccelerate",
    "AccelerateCallback",
]
