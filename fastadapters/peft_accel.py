"""Drop-in acceleration of existing PEFT models: `accelerate(peft_model)` runs PEFT's LoRA Linear (nn.Linear
and GPT-2 Conv1D bases) and Embedding layers through fastadapters' ops, in place.

The swap changes each eligible layer's class to a subclass of PEFT's own class that overrides only
`forward` (and the name its repr prints), so the parameters, state_dict keys, save_pretrained,
merge_and_unload, set_adapter, disable_adapter and the rest of PEFT keep working untouched. Each call checks
that an op computes what PEFT's forward would (one or several active adapters, DoRA, `adapter_names` batches
in inference) and otherwise runs PEFT's forward (adapters disabled or merged, hooks, other LoRA variants, a
base layer that is itself an adapter layer, ...). Layers PEFT injects later are swapped as they appear.
"""

import functools
import sys
from collections import Counter

import torch
from peft.tuners.lora import layer as peft_lora
from peft.tuners.lora.variants import DoraLinearVariant
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


def _scale(scale) -> float:
    # A 0-d tensor after peft.utils.hotswap.prepare_model_for_compiled_hotswap.
    return scale.item() if isinstance(scale, torch.Tensor) else scale


def _fusable_scale(scale) -> bool:
    """Whether the fused ops can take this scaling: a number, or a one-element tensor outside
    torch.compile (reading it there would break the graph; PEFT's path keeps it a tensor)."""
    return not isinstance(scale, torch.Tensor) or (scale.numel() == 1 and not torch.compiler.is_compiling())


class AcceleratedLoraLinear(peft_lora.Linear):
    """PEFT's lora.Linear with its vanilla-LoRA forward replaced by the fastadapters ops.

    One active adapter, or several (their A stacked, their scaled B side by side), runs through the fused
    `lora_linear` op, in training too; `adapter_names` mixed batches run through `multi_lora_linear` when no
    gradient is needed. Each call checks, cheaply, that the op computes exactly what PEFT's forward would
    (see `_plan`); otherwise PEFT's own forward runs.
    """

    def _get_name(self) -> str:
        return "Linear"  # repr stays PEFT's `lora.Linear(...)`

    def _usable(self, x: torch.Tensor, names) -> bool:
        """Whether adapters `names` of this layer are plain LoRA the ops compute as PEFT does for input x:
        no DoRA or LoRA variant, no hooks the ops would skip (on the base layer, lora_A, lora_B, the dropout,
        or global), no live dropout unless one adapter runs, dtypes PEFT casts the same way, one device."""
        for name in names:
            if name in self.lora_variant and not self._dora(name, len(names)):
                return False
            lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            if _hooked(lora_a) or _hooked(lora_b) or _hooked(dropout):
                return False
            if not isinstance(dropout, (nn.Dropout, nn.Identity)):
                return False
            if len(names) > 1 and isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
                return False  # one dropout mask per adapter: the stacked op draws one
            # x is cast to the adapter's dtype only while PEFT's input casting is enabled.
            if x.dtype != lora_a.weight.dtype and not getattr(self, "cast_input_dtype_enabled", True):
                return False
            if lora_a.weight.device != x.device:
                return False
            if not _fusable_scale(self.scaling[name]):
                return False
        return True

    def _dora(self, name: str, adapters: int) -> bool:
        """Whether adapter `name` is DoRA that dora_linear computes as PEFT does: alone, without lora_bias,
        and without live dropout (PEFT's DoRA then recomputes the base product on the dropped input)."""
        dropout = self.lora_dropout[name]
        return (
            isinstance(self.lora_variant[name], DoraLinearVariant)
            and adapters == 1
            and self.lora_B[name].bias is None
            and (isinstance(dropout, nn.Identity) or not self.training)
        )

    def _plan(self, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[str, list] | None:
        """("stack", adapters) or ("mixed", adapter per batch row) for the ops, or None where PEFT's forward
        must run: extra arguments, adapters disabled or merged (PEFT runs the base layer, unmerging first
        where disabled), no active adapter here, a base layer that is itself an adapter layer (LoRA over
        LoHa/LoKr in a mixed model) or not a linear layer, a base dtype PEFT would not accept, hooks, a mixed
        batch that needs a gradient, or adapters `_usable` refuses."""
        if args or self.disable_adapters or self.merged:
            return None
        base = self.base_layer
        if type(base) not in LINEAR_TYPES or not base.weight.dtype.is_floating_point:
            return None
        if _hooked(base) or _global_hooks() or x.device != base.weight.device:
            return None
        # PEFT's base_layer(x) needs x in the base weight's dtype (or autocast).
        if x.dtype != base.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            return None
        names = kwargs.get("adapter_names")
        if names is not None:
            if len(kwargs) > 1 or x.dim() < 2 or len(names) != x.shape[0]:
                return None  # PEFT's forward raises its own error for a length mismatch
            present = sorted({n for n in names if n in self.lora_A})
            if not present or any(n in self.lora_variant for n in present) or not self._usable(x, present):
                return None  # (PEFT refuses DoRA in mixed batches)
            if any(self.lora_B[n].bias is not None for n in present):
                return None
            if torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in self.parameters())
            ):
                return None  # multi_lora_linear is inference-only
            if any(isinstance(d, nn.Dropout) and d.training and d.p > 0 for d in self.lora_dropout.values()):
                return None
            return "mixed", list(names)
        if kwargs:
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not active or not self._usable(x, active):
            return None
        return "stack", active

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plan = self._plan(x, args, kwargs)
        if plan is None:
            return super().forward(x, *args, **kwargs)
        kind, names = plan
        base = self.base_layer
        dtype = compute_dtype(x, base.weight)
        weight = base_weight(base).to(dtype)  # PEFT sets fan_in_fan_out exactly for Conv1D bases
        bias = None if base.bias is None else base.bias.to(dtype)
        if kind == "mixed":
            return self._mixed(x.to(dtype), weight, bias, names)
        if names[0] in self.lora_variant:  # DoRA (see _dora)
            name = names[0]
            return ops.dora_linear(
                x.to(dtype),
                weight,
                bias,
                self.lora_A[name].weight.to(dtype),
                self.lora_B[name].weight.to(dtype),
                self.lora_magnitude_vector[name].weight.to(dtype),
                _scale(self.scaling[name]),
            )
        if len(names) == 1:
            lora_a, lora_b = self.lora_A[names[0]].weight, self.lora_B[names[0]].weight
            scale = _scale(self.scaling[names[0]])
        else:  # Σ s_i (x A_iᵀ) B_iᵀ = (x [A_1; A_2; …]ᵀ) [s_1 B_1, s_2 B_2, …]ᵀ, one fused call
            lora_a = torch.cat([self.lora_A[n].weight.to(dtype) for n in names])
            lora_b = torch.cat([self.lora_B[n].weight.to(dtype) * _scale(self.scaling[n]) for n in names], 1)
            scale = 1.0
        dropout = self.lora_dropout[names[0]]
        y = ops.lora_linear(
            x.to(dtype),
            weight,
            bias,
            lora_a.to(dtype),
            lora_b.to(dtype),
            scale,
            dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            dropout.training,
        )
        for name in names:
            lora_bias = self.lora_B[name].bias
            if lora_bias is not None:  # PEFT's lora_bias=True
                y = y + _scale(self.scaling[name]) * lora_bias.to(dtype)
        return y

    def _mixed(self, x, weight, bias, names: list) -> torch.Tensor:
        """PEFT's `adapter_names` batch (row i uses adapter names[i]; "__base__" or an adapter this layer
        lacks: the base layer only) through multi_lora_linear."""
        present = sorted({n for n in names if n in self.lora_A})
        index = {n: i for i, n in enumerate(present)}
        ids = torch.tensor([index.get(n, -1) for n in names], device=x.device)
        ids = ids.view(-1, *[1] * (x.dim() - 2)).expand(x.shape[:-1])
        dtype = x.dtype
        bank_a = torch.cat([self.lora_A[n].weight.to(dtype) for n in present])
        bank_b = torch.cat([self.lora_B[n].weight.to(dtype).T for n in present])
        ranks = [self.lora_A[n].weight.shape[0] for n in present]
        scales = [float(_scale(self.scaling[n])) for n in present]
        return ops.multi_lora_linear(x, weight, bias, bank_a, bank_b, ranks, scales, ids)


class AcceleratedLoraEmbedding(peft_lora.Embedding):
    """PEFT's lora.Embedding with its LoRA forward run by the `lora_embedding` op (one active adapter, or
    several stacked), in training too; other calls (see `_plan`) take PEFT's forward."""

    def _get_name(self) -> str:
        return "Embedding"  # repr stays PEFT's `lora.Embedding(...)`

    def _plan(self, x: torch.Tensor, args: tuple, kwargs: dict) -> list | None:
        """The active adapters the op runs, or None where PEFT's forward must: extra arguments or
        `adapter_names`, adapters disabled or merged, a base that is not a plain nn.Embedding (a scaled
        embedding, max_norm, scale_grad_by_freq, sparse gradients), hooks, LoRA variants (DoRA), tensor
        parallel input/output functions, or operands on another device."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        base = self.base_layer
        if type(base) is not nn.Embedding or not base.weight.dtype.is_floating_point:
            return None
        if base.max_norm is not None or base.scale_grad_by_freq or base.sparse:
            return None
        if _hooked(base) or _global_hooks() or x.dtype not in (torch.int32, torch.int64):
            return None
        if x.device != base.weight.device:
            return None
        active = [a for a in self.active_adapters if a in self.lora_embedding_A]
        for name in active:
            if name in self.lora_variant or self.input_fns.get(name) or self.output_fns.get(name):
                return None
            if self.lora_embedding_A[name].device != x.device:
                return None
            if not _fusable_scale(self.scaling[name]):
                return None
        return active or None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self._plan(x, args, kwargs)
        if names is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        dtype = base.weight.dtype
        if len(names) == 1:
            lora_a, lora_b = self.lora_embedding_A[names[0]], self.lora_embedding_B[names[0]]
            scale = _scale(self.scaling[names[0]])
        else:  # stacked as in AcceleratedLoraLinear
            lora_a = torch.cat([self.lora_embedding_A[n].to(dtype) for n in names])
            lora_b = torch.cat(
                [self.lora_embedding_B[n].to(dtype) * _scale(self.scaling[n]) for n in names], 1
            )
            scale = 1.0
        return ops.lora_embedding(x, base.weight, lora_a.to(dtype), lora_b.to(dtype), scale, base.padding_idx)


class _AcceleratedConv:
    """PEFT's lora.Conv1d/2d/3d with its LoRA forward run by the `lora_conv` op (the update folded into the
    kernel: one convolution), one or several active adapters, in training too; other calls (see `_plan`)
    take PEFT's forward."""

    def _get_name(self) -> str:
        return type(self).__mro__[2].__name__  # repr stays PEFT's `lora.Conv2d(...)`

    def _plan(self, x: torch.Tensor, args: tuple, kwargs: dict) -> list | None:
        """The active adapters the op runs, or None where PEFT's forward must: extra arguments or
        `adapter_names`, adapters disabled or merged, a base that is not a plain zero-padded convolution
        (groups, dilation, padding given as a string), unbatched input, hooks, LoRA variants (DoRA),
        lora_bias, live dropout (PEFT drops the input of lora_A only), dtypes, or another device."""
        if args or kwargs or self.disable_adapters or self.merged:
            return None
        base = self.base_layer
        if type(base) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d) or not base.weight.dtype.is_floating_point:
            return None
        if base.groups != 1 or any(d != 1 for d in base.dilation) or base.padding_mode != "zeros":
            return None
        if isinstance(base.padding, str) or x.dim() != base.weight.dim():
            return None
        if _hooked(base) or _global_hooks() or x.dtype != base.weight.dtype or x.device != base.weight.device:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        active = [a for a in self.active_adapters if a in self.lora_A]
        for name in active:
            lora_a, lora_b, dropout = self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            if name in self.lora_variant or lora_b.bias is not None:
                return None
            if _hooked(lora_a) or _hooked(lora_b) or _hooked(dropout):
                return None
            if not (
                isinstance(dropout, nn.Identity) or (isinstance(dropout, nn.Dropout) and not dropout.training)
            ):
                return None
            if lora_a.stride != base.stride or lora_a.padding != base.padding or lora_a.groups != 1:
                return None
            if (
                any(d != 1 for d in lora_a.dilation)
                or lora_b.groups != 1
                or any(s != 1 for s in lora_b.stride)
            ):
                return None
            if x.dtype != lora_a.weight.dtype and not getattr(self, "cast_input_dtype_enabled", True):
                return None
            if lora_a.weight.device != x.device:
                return None
            if not _fusable_scale(self.scaling[name]):
                return None
        return active or None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self._plan(x, args, kwargs)
        if names is None:
            return super().forward(x, *args, **kwargs)
        base = self.base_layer
        dtype = x.dtype
        lora_a = torch.cat([self.lora_A[n].weight.to(dtype) for n in names])
        lora_b = torch.cat([self.lora_B[n].weight.to(dtype) * _scale(self.scaling[n]) for n in names], 1)
        bias = None if base.bias is None else base.bias.to(dtype)
        return ops.lora_conv(x, base.weight, bias, lora_a, lora_b, 1.0, list(base.stride), list(base.padding))


class AcceleratedLoraConv1d(_AcceleratedConv, peft_lora.Conv1d):
    pass


class AcceleratedLoraConv2d(_AcceleratedConv, peft_lora.Conv2d):
    pass


class AcceleratedLoraConv3d(_AcceleratedConv, peft_lora.Conv3d):
    pass


# PEFT's layer classes and their accelerated subclasses.
_ACCELERATED = {
    peft_lora.Linear: AcceleratedLoraLinear,
    peft_lora.Embedding: AcceleratedLoraEmbedding,
    peft_lora.Conv1d: AcceleratedLoraConv1d,
    peft_lora.Conv2d: AcceleratedLoraConv2d,
    peft_lora.Conv3d: AcceleratedLoraConv3d,
}
_PEFT_CLASS = {v: k for k, v in _ACCELERATED.items()}


def _why_not(module: nn.Module) -> str | None:
    """Why a PEFT tuner layer cannot be accelerated, or None if it can (its calls may still take PEFT's
    path; see AcceleratedLoraLinear._plan)."""
    cls = type(module)
    if cls not in _ACCELERATED and cls not in _ACCELERATED.values():
        if "bnb" in cls.__module__ or "Linear8bit" in cls.__name__ or "Linear4bit" in cls.__name__:
            return "quantised base layer (bitsandbytes)"
        name = f"{cls.__module__.removeprefix('peft.tuners.')}.{cls.__name__}"
        return f"not a LoRA Linear, Embedding or Conv ({name})"
    if issubclass(cls, peft_lora.Embedding):
        base = module.base_layer
        return (
            None if type(base) is nn.Embedding else f"base layer is {type(base).__name__}, not nn.Embedding"
        )
    if issubclass(cls, peft_lora._ConvNd):
        base = module.base_layer
        if type(base) not in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
            return f"base layer is {type(base).__name__}, not nn.Conv1d/2d/3d"
        return None
    variants = {a: v for a, v in module.lora_variant.items() if not isinstance(v, DoraLinearVariant)}
    if variants and all(a in variants for a in module.lora_A):
        return "LoRA variant (" + ", ".join(sorted(type(v).__name__ for v in variants.values())) + ")"
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
            module.__class__ = _ACCELERATED.get(type(module), type(module))
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
    """Undoes `accelerate`: every layer goes back to PEFT's own class; layers added later stay PEFT's."""
    _mark(peft_model, False)
    for module in peft_model.modules():
        if type(module) in _PEFT_CLASS:
            module.__class__ = _PEFT_CLASS[type(module)]
    peft_model.__dict__.pop("fastadapters_summary", None)
    return peft_model


class AccelerateCallback(TrainerCallback):
    """HF Trainer switch: `Trainer(..., callbacks=[fastadapters.AccelerateCallback()])` accelerates the
    PEFT model when training begins."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not hasattr(model, "fastadapters_summary"):
            accelerate(model)
