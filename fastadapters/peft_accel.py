"""Drop-in acceleration of existing PEFT models: `accelerate(peft_model)` runs every eligible PEFT LoRA
Linear (and GPT-2 Conv1D) through fastadapters' fused LoRA op, in place.

The swap changes each eligible layer's class to a subclass of PEFT's own `lora.Linear` that overrides
only `forward`, so the parameters, state_dict keys, save_pretrained, merge_and_unload, set_adapter,
disable_adapter and the rest of PEFT keep working untouched. Calls the fused op cannot serve exactly
(adapters disabled or merged, `adapter_names` mixed batches, several active adapters, LoRA variants)
take PEFT's own forward.
"""

import sys
from collections import Counter

import torch
from peft.tuners.lora import layer as peft_lora
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import TrainerCallback

from fastadapters import ops
from fastadapters.families import LINEAR_TYPES, base_weight
from fastadapters.layers import compute_dtype


class AcceleratedLoraLinear(peft_lora.Linear):
    """PEFT's lora.Linear with its vanilla-LoRA forward replaced by the fused op."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if (
            args
            or kwargs
            or self.disable_adapters
            or self.merged
            or len(active) != 1
            or active[0] in self.lora_variant
        ):
            return super().forward(x, *args, **kwargs)
        name = active[0]
        base = self.get_base_layer()
        dropout = self.lora_dropout[name]
        dropout_p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        scale = self.scaling[name]
        dtype = compute_dtype(x, base.weight)
        weight = base_weight(base)  # PEFT sets fan_in_fan_out exactly for Conv1D bases
        bias = None if base.bias is None else base.bias.to(dtype)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        y = ops.lora_linear(
            x.to(dtype),
            weight.to(dtype),
            bias,
            lora_a.weight.to(dtype),
            lora_b.weight.to(dtype),
            scale,
            dropout_p,
            dropout.training,
        )
        if lora_b.bias is not None:  # PEFT's lora_bias=True
            y = y + scale * lora_b.bias.to(dtype)
        return y


def _why_not(module: nn.Module) -> str | None:
    """Why a PEFT tuner layer cannot be accelerated, or None if it can."""
    if type(module) not in (peft_lora.Linear, AcceleratedLoraLinear):
        cls = type(module)
        if "bnb" in cls.__module__ or "Linear8bit" in cls.__name__ or "Linear4bit" in cls.__name__:
            return "quantised base layer (bitsandbytes)"
        return f"not a LoRA Linear ({cls.__module__.removeprefix('peft.tuners.')}.{cls.__name__})"
    if any(module.use_dora.values()):
        return "DoRA"
    if module.lora_variant:
        return (
            "LoRA variant (" + ", ".join(sorted(type(v).__name__ for v in module.lora_variant.values())) + ")"
        )
    base = module.get_base_layer()
    if type(base) not in LINEAR_TYPES:
        return f"base layer is {type(base).__name__}, not nn.Linear or Conv1D"
    if not base.weight.dtype.is_floating_point:
        return f"base weight dtype {base.weight.dtype}"
    if base._forward_hooks or base._forward_pre_hooks:
        return "base layer has forward hooks"
    return None


def accelerate(peft_model: nn.Module, verbose: bool = True) -> nn.Module:
    """Runs every eligible PEFT LoRA layer of `peft_model` through the fused op; returns the same object.

    Prints one summary line (accelerated, left on PEFT's path and why) unless verbose=False; the line is
    also kept as `peft_model.fastadapters_summary`.
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(
            f"peft_model must be a torch.nn.Module (a model from peft.get_peft_model or "
            f"PeftModel.from_pretrained), got {type(peft_model).__name__}"
        )
    accelerated, skipped = 0, Counter()
    for module in peft_model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        reason = _why_not(module)
        if reason is None:
            module.__class__ = AcceleratedLoraLinear
            accelerated += 1
        else:
            skipped[reason] += 1
    left = sum(skipped.values())
    summary = f"fastadapters.accelerate: {accelerated} LoRA layers accelerated, {left} left on PEFT"
    if skipped:
        summary += " (" + "; ".join(f"{n}: {why}" for why, n in sorted(skipped.items())) + ")"
    if accelerated == 0:
        summary += " - nothing was accelerated"
    peft_model.fastadapters_summary = summary
    if verbose:
        print(summary, file=sys.stderr)
    return peft_model


def deaccelerate(peft_model: nn.Module) -> nn.Module:
    """Undoes `accelerate`: every layer goes back to PEFT's own lora.Linear."""
    for module in peft_model.modules():
        if type(module) is AcceleratedLoraLinear:
            module.__class__ = peft_lora.Linear
    peft_model.__dict__.pop("fastadapters_summary", None)
    return peft_model


class AccelerateCallback(TrainerCallback):
    """HF Trainer switch: `Trainer(..., callbacks=[fastadapters.AccelerateCallback()])` accelerates the
    PEFT model when training begins."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not hasattr(model, "fastadapters_summary"):
            accelerate(model)
