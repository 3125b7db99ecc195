"""fastadapters: fused kernels for adapter fine-tuning and multi-adapter serving of LLMs."""

from fastadapters import _ext  # noqa: F401  (loads the compiled extension once, or warns once)
from fastadapters import ops, reference
from fastadapters.config import LoraConfig
from fastadapters.io import load, load_peft, save, save_peft
from fastadapters.patch import apply, merge, remove, trainable_parameters, unmerge

__version__ = "0.1.0"

__all__ = [
    "LoraConfig",
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
]
