"""nn.Modules that hold adapters. Every adapter module derives from AdapterModule: its parameters,
except those under `base_layer`, are the adapter's (what save/load and trainable_parameters see)."""

import math
import weakref

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastadapters import ops


class AdapterModule(nn.Module):
    """Marks a module whose non-`base_layer` parameters are adapter parameters."""

    def adapter_named_parameters(self):
        for name, p in self.named_parameters():
            if not name.startswith("base_layer."):
                yield name, p


def linear_shape(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a transposed HF Conv1D."""
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when active, else the base weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class LoraLinear(AdapterModule):
    """y = base(x) + scale · B(A(dropout(x))) around a frozen nn.Linear or HF Conv1D (GPT-2).

    The adapter weights are kept in fp32 when the base is fp16/bf16 (as PEFT does) and cast to the
    compute dtype for the fused op; gradients flow back to the fp32 copies.
    """

    def __init__(self, base_layer: nn.Module, r: int, scale: float, dropout_p: float, init_weights: bool = True):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)
        d_in, d_out = linear_shape(base_layer)
        w = base_layer.weight
        dtype = w.dtype if w.dtype == torch.float32 or not w.dtype.is_floating_point else torch.float32
        self.lora_A = nn.Linear(d_in, r, bias=False, device=w.device, dtype=dtype)
        self.lora_B = nn.Linear(r, d_out, bias=False, device=w.device, dtype=dtype)
        self.r, self.scale, self.dropout_p = r, scale, dropout_p
        self.merged = False
        self.group: LoraGroup | None = None
        if init_weights and w.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as [d_out, d_in] (a transposed view for Conv1D)."""
        w = self.base_layer.weight
        return w.T if self.fan_in_fan_out else w

    def operands(self, dtype: torch.dtype):
        """(weight, bias, A, B) in `dtype`, as the op takes them."""
        b = self.base_layer.bias
        return (
            self.base_weight().to(dtype),
            None if b is None else b.to(dtype),
            self.lora_A.weight.to(dtype),
            self.lora_B.weight.to(dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.group is not None and not torch.compiler.is_compiling():
            return self.group.output(self, x)
        dtype = compute_dtype(x, self.base_layer.weight)
        return ops.lora_linear(x.to(dtype), *self.operands(dtype), self.scale, self.dropout_p, self.training)

    def delta_weight(self) -> torch.Tensor:
        """scale · B A in the base weight's layout and dtype."""
        delta = self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return (delta.T if self.fan_in_fan_out else delta).to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_layer.weight -= self.delta_weight()
            self.merged = False


class LoraGroup:
    """LoRA siblings that read one input (q/k/v, or gate/up).

    The first member called computes every member's output with one grouped op (x read once, one
    shrink); the others then take their output from here if they are called with the same tensor,
    unchanged. Any other call falls back to the member's own op.
    """

    def __init__(self, members: list[LoraLinear]):
        self.members = members
        self._pending: dict[int, tuple] = {}

    def output(self, layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
        hit = self._pending.pop(id(layer), None)
        if hit is not None and hit[0]() is x and hit[1] == x._version:
            return hit[2]
        members = self.members
        if any(m.merged or m.dropout_p != layer.dropout_p or m.training != layer.training for m in members):
            members = [layer]
        dtype = compute_dtype(x, layer.base_layer.weight)
        operands = [m.operands(dtype) for m in members]
        ys = ops.lora_linear_grouped(
            x.to(dtype),
            *[list(col) for col in zip(*operands)],
            [m.scale for m in members],
            layer.dropout_p,
            layer.training,
        )
        ref = weakref.ref(x)
        self._pending = {id(m): (ref, x._version, y) for m, y in zip(members, ys) if m is not layer}
        return ys[members.index(layer)]
