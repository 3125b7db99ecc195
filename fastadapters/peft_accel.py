"""Drop-in acceleration of existing PEFT models: `accelerate(peft_model)` runs every eligible PEFT LoRA
Linear (and GPT-2 Conv1D) through fastadapters' fused LoRA op, in place.

The swap changes each eligible layer's class to a subclass of PEFT's own `lora.Linear` that overrides
only `forward`, so the parameters, state_dict keys, save_pretrained, merge_and_unload, set_adapter,
disable_adapter and the rest of PEFT keep working untouched. Calls the fused op cannot serve exactly
(adapters disabled or merged, `adapter_names` mixed batches, several active adapters, LoRA variants)
take PEFT's own forward.
"""

import functools
import sys
from collections import Counter

import torch
from peft.tuners.lora import layer as peft_lora
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from transformers import TrainerCallback

from fastadapters import ops
from fastadapters.families import LINEAR_TYPES, base_weight
from fastadapters.layers import compute_dtype

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    """Whether `module` has hooks that only run when it is called as a module (PEFT's path calls it)."""
    return any(getattr(module, h) for h in _HOOKS)


def _global_hooks() -> bool:
    """Whether module hooks registered for every module are active (torch.nn.modules.module's globals)."""
    g = nn.modules.module
    return bool(
        g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
    )


class AcceleratedLoraLinear(peft_lora.Linear):
    """PEFT's lora.Linear with its vanilla-LoRA forward replaced by the fused op.

    Each call checks, cheaply, that the fused op computes exactly what PEFT's forward would; otherwise (see
    `_fused_adapter`) PEFT's own forward runs.
    """

    def _get_name(self) -> str:
        return "Linear"  # repr stays PEFT's `lora.Linear(...)`

    def _fused_adapter(self, x: torch.Tensor, args: tuple, kwargs: dict) -> str | None:
        """The one adapter the fused op can run for this call, or None when PEFT's forward must: extra
        arguments, adapters disabled or merged, several (or no) active adapters, DoRA or a LoRA variant, a
        base layer that is itself an adapter layer (LoRA over LoHa/LoKr in a mixed model) or not a linear
        layer, hooks the fused op would skip (on the base layer, lora_A, lora_B, the dropout, or global),
        dtypes PEFT would not cast to one another, or operands on another device."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) != 1:
            return None
        name = active[0]
        if name in self.lora_variant or self.use_dora.get(name, False):
            return None
        base = self.base_layer
        if type(base) not in LINEAR_TYPES or not base.weight.dtype.is_floating_point:
            return None
        lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
        if _hooked(base) or _hooked(lora_a) or _hooked(lora_b) or _hooked(dropout) or _global_hooks():
            return None
        if not isinstance(dropout, (nn.Dropout, nn.Identity)):
            return None
        # PEFT: base_layer(x) needs x in the base weight's dtype (or autocast); x is cast to the adapter's
        # dtype only while input casting is enabled.
        if x.dtype != base.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return None
        if x.dtype != lora_a.weight.dtype and not getattr(self, "cast_input_dtype_enabled", True):
            return None
        if x.device != base.weight.device or x.device != lora_a.weight.device:
            return None
        scale = self.scaling[name]
        if isinstance(scale, torch.Tensor) and (scale.numel() != 1 or torch.compiler.is_compiling()):
            return None
        return name

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        name = self._fused_adapter(x, args, kwargs)
        if name is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        dropout = self.lora_dropout[name]
        dropout_p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        scale = self.scaling[name]
        if isinstance(scale, torch.Tensor):  # 0-d, from peft.utils.hotswap.prepare_model_for_compiled_hotswap
            scale = scale.item()
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
    """Why a PEFT tuner layer cannot be accelerated, or None if it can (its calls may still take PEFT's
    path; see AcceleratedLoraLinear._fused_adapter)."""
    if type(module) not in (peft_lora.Linear, AcceleratedLoraLinear):
        cls = type(module)
        if "bnb" in cls.__module__ or "Linear8bit" in cls.__name__ or "Linear4bit" in cls.__name__:
            return "quantised base layer (bitsandbytes)"
        return f"not a LoRA Linear ({cls.__module__.removeprefix('peft.tuners.')}.{cls.__name__})"
    if module.use_dora and all(module.use_dora.get(a, False) for a in module.lora_A):
        return "DoRA"
    if module.lora_variant and all(a in module.lora_variant for a in module.lora_A):
        return (
            "LoRA variant (" + ", ".join(sorted(type(v).__name__ for v in module.lora_variant.values())) + ")"
        )
    if isinstance(module.base_layer, BaseTunerLayer):
        return f"base layer is another adapter layer ({type(module.base_layer).__name__})"
    base = module.base_layer
    if type(base) not in LINEAR_TYPES:
        return f"base layer is {type(base).__name__}, not nn.Linear or Conv1D"
    if not base.weight.dtype.is_floating_point:
        return f"base weight dtype {base.weight.dtype}"
    return None


# Set on every module `accelerate` was called on, on its tuners and on their models: adapter layers PEFT
# injects into them later (add_adapter, load_adapter, inject_adapter_in_model) are accelerated too. A plain
# flag, so that copies (deepcopy, pickle) of an accelerated model keep it.
_FLAG = "_fastadapters_accelerated"
_injection_hooked = False


def _swap(peft_model: nn.Module) -> str:
    """Swaps every eligible layer's class; returns the summary line."""
    accelerated, hooked, skipped = 0, 0, Counter()
    for module in peft_model.modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        reason = _why_not(module)
        if reason is None:
            module.__class__ = AcceleratedLoraLinear
            accelerated += 1
            lora = [m for a in module.lora_A for m in (module.lora_A[a], module.lora_B[a])]
            hooked += any(_hooked(m) for m in (module.base_layer, *lora))
        else:
            skipped[reason] += 1
    left = sum(skipped.values())
    summary = f"fastadapters.accelerate: {accelerated} LoRA layers accelerated, {left} left on PEFT"
    if skipped:
        summary += " (" + "; ".join(f"{n}: {why}" for why, n in sorted(skipped.items())) + ")"
    if hooked:
        summary += (
            f"; {hooked} of the accelerated have forward hooks on their base layer or lora_A/lora_B, and run "
            "on PEFT's path while those hooks are there"
        )
    if accelerated == 0:
        summary += " - nothing was accelerated"
    return summary


def _mark(peft_model: nn.Module, flag: bool) -> None:
    for module in (peft_model, *peft_model.modules()):
        if module is peft_model or isinstance(module, BaseTuner):
            inner = getattr(module, "model", None)
            for m in (module, inner) if isinstance(inner, nn.Module) else (module,):
                if flag:
                    m.__dict__[_FLAG] = True
                else:
                    m.__dict__.pop(_FLAG, None)


def _hook_injection() -> None:
    """Wraps PEFT's BaseTuner.inject_adapter once: layers injected into an accelerated model are swapped."""
    global _injection_hooked
    if _injection_hooked:
        return
    inject = BaseTuner.inject_adapter

    @functools.wraps(inject)
    def inject_adapter(self, model, *args, **kwargs):
        out = inject(self, model, *args, **kwargs)
        if model.__dict__.get(_FLAG) or self.__dict__.get(_FLAG):
            _mark(self, True)
            _swap(model)
        return out

    BaseTuner.inject_adapter = inject_adapter
    _injection_hooked = True


def accelerate(peft_model: nn.Module, verbose: bool = True) -> nn.Module:
    """Runs every eligible PEFT LoRA layer of `peft_model` through the fused op; returns the same object.

    Layers that PEFT adds to the model later (add_adapter, load_adapter, inject_adapter_in_model) are
    accelerated as they appear. Prints one summary line (accelerated, left on PEFT's path and why) unless
    verbose=False; the line is also kept as `peft_model.fastadapters_summary`.
    """
    if not isinstance(peft_model, nn.Module):
        raise TypeError(
            f"peft_model must be a torch.nn.Module (a model from peft.get_peft_model or "
            f"PeftModel.from_pretrained), got {type(peft_model).__name__}"
        )
    _hook_injection()
    _mark(peft_model, True)
    summary = _swap(peft_model)
    peft_model.fastadapters_summary = summary
    if verbose:
        print(summary, file=sys.stderr)
    return peft_model


def deaccelerate(peft_model: nn.Module) -> nn.Module:
    """Undoes `accelerate`: every layer goes back to PEFT's own lora.Linear; later layers stay PEFT's."""
    _mark(peft_model, False)
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
