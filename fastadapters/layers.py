"""nn.Modules that hold adapters. Every adapter module derives from AdapterModule: its parameters,
except those under `base_layer`, are the adapter's (what save/load and trainable_parameters see)."""

import math
import weakref

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastadapters import ops
from fastadapters.families import PLACEMENTS, base_weight, linear_shape, placement_shape


class AdapterModule(nn.Module):
    """Marks a module whose non-`base_layer` parameters are adapter parameters."""

    def adapter_named_parameters(self):
        for name, p in self.named_parameters():
            if not name.startswith("base_layer."):
                yield name, p


class _WrapsLinear(AdapterModule):
    """An adapter around a linear layer: `weight` and `bias` are the wrapped layer's (as PEFT's layers), for
    models that read them directly (Mamba's mixer)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when active, else the base weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


class LoraLinear(_WrapsLinear):
    """y = base(x) + scale · B(A(dropout(x))) around a frozen nn.Linear or HF Conv1D (GPT-2).

    The adapter weights are kept in fp32 when the base is fp16/bf16 (as PEFT does) and cast to the
    compute dtype for the fused op; gradients flow back to the fp32 copies.
    """

    def __init__(
        self, base_layer: nn.Module, r: int, scale: float, dropout_p: float, init_weights: bool = True
    ):
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
        self.merged_base: torch.Tensor | None = None  # the base weight as it was before merge, if kept
        self.group: LoraGroup | None = None
        if init_weights and w.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)
        self.train(base_layer.training)  # an eval model stays in eval: no dropout at inference

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as [d_out, d_in] (a transposed view for Conv1D)."""
        return base_weight(self.base_layer)

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
            y = self.base_layer(x)
            if torch.is_grad_enabled() and self.lora_A.weight.requires_grad:
                y = _MergedLora.apply(y, self.lora_A.weight)  # backward would leave A and B without gradient
            return y
        if self.group is not None and not torch.compiler.is_compiling():
            return self.group.output(self, x)
        dtype = compute_dtype(x, self.base_layer.weight)
        return ops.lora_linear(x.to(dtype), *self.operands(dtype), self.scale, self.dropout_p, self.training)

    def delta_weight(self) -> torch.Tensor:
        """scale · B A in the base weight's layout and dtype."""
        delta = self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return (delta.T if self.fan_in_fan_out else delta).to(self.base_layer.weight.dtype)

    @torch.no_grad()
    def merge(self, keep_base: bool | str = True):
        """Adds scale·BA into the base weight. keep_base=True keeps a copy of the weight as it was (its dtype,
        its device), "cpu" keeps it on the CPU, False keeps none."""
        if not self.merged:
            w = self.base_layer.weight
            if keep_base is not False:
                self.merged_base = w.detach().to("cpu" if keep_base == "cpu" else w.device, copy=True)
            w += self.delta_weight()
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Puts back the base weight kept by merge, bit for bit; without a kept copy, subtracts scale·BA
        (the base weight then differs from the original by the rounding of its dtype)."""
        if self.merged:
            if self.merged_base is not None:
                self.base_layer.weight.copy_(self.merged_base)
            else:
                self.base_layer.weight -= self.delta_weight()
            self.merged_base = None
            self.merged = False


class _MergedLora(torch.autograd.Function):
    """Identity on a merged LoRA layer's output whose backward refuses: merged, A and B get no gradient."""

    @staticmethod
    def forward(ctx, y, lora_weight):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError(
            "backward through a merged LoRA layer: its adapter weights are folded into the base weight and "
            "would get no gradient; call fastadapters.unmerge(model) before training (or run the merged "
            "model under torch.no_grad())"
        )


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


class BottleneckAdapter(_WrapsLinear):
    """A frozen nn.Linear (or HF Conv1D) with an LLM-Adapters bottleneck A(t) = s · up(f(down(drop(t)))).

    placement "mh" (on the input): base(x + A(x)); "output": h + A(h) with h = base(x); "parallel":
    base(x) + A(x). Parameters keep LLM-Adapters' names: adapter_down.weight [b, d], adapter_up.weight
    [d', b] (no bias) and, with learned scaling, adapter_scaling [1]. They are kept in fp32 when the base is
    fp16/bf16 and cast to the compute dtype for the fused op.
    """

    PLACEMENTS = PLACEMENTS
    KINDS = PLACEMENTS  # the former name

    def __init__(
        self,
        base_layer: nn.Module,
        placement: str,
        bottleneck_size: int,
        non_linearity: str,
        adapter_dropout: float = 0.0,
        scaling: float | str = 1.0,
        init_weights: str = "bert",
    ):
        super().__init__()
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        self.base_layer = base_layer
        self.placement = placement
        a_in, a_out = placement_shape(placement, *linear_shape(base_layer))
        w = base_layer.weight
        dtype = w.dtype if w.dtype == torch.float32 or not w.dtype.is_floating_point else torch.float32
        self.adapter_down = nn.Linear(a_in, bottleneck_size, bias=False, device=w.device, dtype=dtype)
        self.adapter_up = nn.Linear(bottleneck_size, a_out, bias=False, device=w.device, dtype=dtype)
        if scaling == "learned":
            self.adapter_scaling = nn.Parameter(torch.ones(1, device=w.device, dtype=dtype))
        else:
            self.adapter_scaling = float(scaling)
        self.non_linearity, self.dropout_p = non_linearity, adapter_dropout
        self.train(base_layer.training)  # a new module defaults to training mode; follow the model's
        if w.device.type != "meta":
            if init_weights == "bert":
                nn.init.normal_(self.adapter_down.weight, mean=0.0, std=0.02)
                nn.init.normal_(self.adapter_up.weight, mean=0.0, std=0.02)
            elif init_weights == "mam_adapter":
                nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
                nn.init.zeros_(self.adapter_up.weight)
            else:
                raise ValueError(f"init_weights must be 'bert' or 'mam_adapter', got {init_weights!r}")

    def adapter(self, t: torch.Tensor, dtype: torch.dtype, residual: torch.Tensor | None = None):
        """residual + A(t) (residual = t when None), computed by the fused op in `dtype`."""
        s = self.adapter_scaling
        scale = s.to(dtype).reshape(()) if isinstance(s, torch.Tensor) else s
        return ops.bottleneck_adapter(
            t.to(dtype),
            self.adapter_down.weight.to(dtype),
            self.adapter_up.weight.to(dtype),
            scale,
            self.non_linearity,
            self.dropout_p,
            self.training,
            None if residual is None else residual.to(dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x, self.base_layer.weight)
        if self.placement == "mh":
            return self.base_layer(self.adapter(x, dtype).to(x.dtype))
        y = self.base_layer(x)
        if self.placement == "output":
            return self.adapter(y, dtype)
        return self.adapter(x, dtype, residual=y)

    @property
    def kind(self) -> str:
        """The former name of `placement`."""
        return self.placement
