"""Public functional ops. Each checks its inputs once, then dispatches to a backend (see _dispatch)."""

from fastadapters.ops._dispatch import BACKENDS, use_backend
from fastadapters.ops.bottleneck import bottleneck_adapter, bottleneck_dropout_mask
from fastadapters.ops.lora import lora_dropout_mask, lora_linear, lora_linear_grouped
from fastadapters.ops.multi_lora import (
    AdapterSchedule,
    adapter_schedule,
    multi_bottleneck_adapter,
    multi_lora_linear,
    multi_lora_linear_grouped,
)
from fastadapters.ops.prefix_attention import prefix_attention

__all__ = ["BACKENDS", "use_backend", "lora_linear", "lora_linear_grouped", "lora_dropout_mask"]
__all__ += ["bottleneck_adapter", "bottleneck_dropout_mask"]
__all__ += ["multi_lora_linear", "multi_lora_linear_grouped", "adapter_schedule", "AdapterSchedule"]
__all__ += ["multi_bottleneck_adapter"]
__all__ += ["prefix_attention"]
