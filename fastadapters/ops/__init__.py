"""Public functional ops. Each checks its inputs once, then dispatches to a backend (see _dispatch).

`BACKENDS` names the backends; `backend_for(op, device, dtype, **info)` says which one would run a call.
"""

from fastadapters.ops._dispatch import BACKENDS, backend_for, use_backend
from fastadapters.ops.bottleneck import bottleneck_adapter, bottleneck_dropout_mask
from fastadapters.ops.lora import (
    dora_linear,
    lora_dropout_mask,
    lora_linear,
    lora_linear_grouped,
    lora_weight_norm,
)
from fastadapters.ops.lora_conv import lora_conv
from fastadapters.ops.lora_embedding import lora_embedding
from fastadapters.ops.multi_bottleneck import multi_bottleneck_adapter
from fastadapters.ops.multi_lora import multi_lora_linear, multi_lora_linear_grouped
from fastadapters.ops.prefix_attention import prefix_attention
from fastadapters.ops.schedule import AdapterSchedule, adapter_schedule

__all__ = [
    "BACKENDS",
    "backend_for",
    "use_backend",
    "lora_linear",
    "lora_linear_grouped",
    "lora_dropout_mask",
    "dora_linear",
    "lora_weight_norm",
    "lora_embedding",
    "lora_conv",
]
__all__ += ["bottleneck_adapter", "bottleneck_dropout_mask"]
__all__ += ["multi_lora_linear", "multi_lora_linear_grouped", "adapter_schedule", "AdapterSchedule"]
__all__ += ["multi_bottleneck_adapter"]
__all__ += ["prefix_attention"]
