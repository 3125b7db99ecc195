"""Public functional ops. Each checks its inputs once, then dispatches to a backend (see _dispatch)."""

from fastadapters.ops._dispatch import BACKENDS, use_backend
from fastadapters.ops.lora import lora_dropout_mask, lora_linear, lora_linear_grouped

__all__ = ["BACKENDS", "use_backend", "lora_linear", "lora_linear_grouped", "lora_dropout_mask"]
