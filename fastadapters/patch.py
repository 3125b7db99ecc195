"""Apply adapters to a HuggingFace model in place, and undo it.

Placement lives in per-family tables: adding a family means adding rows, not code. Each adapter kind
registers (apply, remove) in ADAPTER_KINDS keyed by its config class; `apply` validates everything
before it changes the model, so a bad config leaves the model untouched.
"""

from torch import nn
from transformers.pytorch_utils import Conv1D

from fastadapters.config import BottleneckConfig, LoraConfig, PrefixConfig
from fastadapters.layers import AdapterModule, BottleneckAdapter, LoraGroup, LoraLinear
from fastadapters.prefix import ADAPTER_KINDS as _PROMPT_KINDS
from fastadapters.prefix import apply_prefix, remove_prefix

# Default LoRA targets of LLM-Adapters' finetune script (GPT-2 has no q/v split: its fused c_attn).
LORA_TARGETS = {
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bloom": ("query_key_value",),
    "gpt_neox": ("query_key_value",),
}

# Linear layers that read the same input tensor; their LoRAs share one shrink (the grouped op).
SHARED_INPUT_GROUPS = {
    "llama": (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
    "mistral": (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
    "qwen2": (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")),
    "opt": (("q_proj", "k_proj", "v_proj"),),
    "gptj": (("q_proj", "k_proj", "v_proj"),),
}

LINEAR_TYPES = (nn.Linear, Conv1D)


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def resolve_targets(model: nn.Module, targets, table: dict, what: str) -> list[str]:
    """The target names: the given list, else the family's default from `table`."""
    if targets is not None:
        return list(targets)
    kind = model_type(model)
    if kind not in table:
        raise ValueError(
            f"model_type {kind!r} has no default {what} targets (known families: {sorted(table)}); "
            "pass target_modules explicitly"
        )
    return list(table[kind])


def matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: list[str], types=LINEAR_TYPES) -> dict[str, nn.Module]:
    """name -> module for every module matching a target; each target must match at least one module."""
    found, unmatched = {}, []
    named = [(n, m) for n, m in model.named_modules() if n and not isinstance(m, AdapterModule)]
    for target in targets:
        hits = [(n, m) for n, m in named if matches(n, target)]
        if not hits:
            unmatched.append(target)
        for n, m in hits:
            if not isinstance(m, types):
                raise ValueError(
                    f"target module {n!r} is a {type(m).__name__}; expected one of "
                    f"{[t.__name__ for t in types]}"
                )
            found[n] = m
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in named if isinstance(m, LINEAR_TYPES)})
        raise ValueError(
            f"target_modules {unmatched} match no module of the model; its linear layers are {leaves}"
        )
    return found


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _apply_lora(model: nn.Module, config: LoraConfig) -> None:
    targets = find_targets(model, resolve_targets(model, config.target_modules, LORA_TARGETS, "LoRA"))
    layers = {}
    for name, base in targets.items():
        layers[name] = LoraLinear(base, config.r, config.scale, config.lora_dropout, config.init_lora_weights)
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    for group in SHARED_INPUT_GROUPS.get(model_type(model), ()):
        parents = {n.rpartition(".")[0] for n in layers if n.rpartition(".")[2] == group[0]}
        for parent in parents:
            members = [layers.get(f"{parent}.{leaf}" if parent else leaf) for leaf in group]
            members = [m for m in members if m is not None]
            if len(members) > 1:
                shared = LoraGroup(members)
                for m in members:
                    m.group = shared


def _remove_wrappers(model: nn.Module, cls: type) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, cls):
            if isinstance(module, LoraLinear):
                module.unmerge()
            set_submodule(model, name, module.base_layer)


ADAPTER_KINDS = {LoraConfig: (_apply_lora, lambda model: _remove_wrappers(model, LoraLinear))}

# Bottleneck placement, after LLM-Adapters (peft/src/peft/tuners/bottleneck.py, its adapter-type mapping):
# an "mh" target gets the adapter on its input, an "output" target on its output. LLM-Adapters lists llama,
# bloom, gptj and opt; the other families follow the same rule: the MLP's input projections are "mh", its
# output projection "output". Keys match a module's name or a dotted suffix of it (GPT-2's attention has a
# c_proj too, hence "mlp.c_proj").
_LLAMA_BOTTLENECK_KINDS = {"gate_proj": "mh", "up_proj": "mh", "down_proj": "output"}
BOTTLENECK_KINDS = {
    "llama": _LLAMA_BOTTLENECK_KINDS,
    "mistral": _LLAMA_BOTTLENECK_KINDS,
    "qwen2": _LLAMA_BOTTLENECK_KINDS,
    "bloom": {"dense_h_to_4h": "mh", "dense_4h_to_h": "output"},
    "gpt_neox": {"dense_h_to_4h": "mh", "dense_4h_to_h": "output"},
    "gptj": {"fc_in": "mh", "fc_out": "output"},
    "opt": {"fc1": "mh", "fc2": "output"},
    "gpt2": {"mlp.c_fc": "mh", "mlp.c_proj": "output"},
}
# Default targets (LLM-Adapters peft/src/peft/mapping.py): AdapterH takes every module of the kind table,
# AdapterP the output kind, the parallel adapter the attention projections. (The paper's best parallel
# runs pass target_modules=["up_proj", "down_proj"] explicitly.)
ADAPTERH_TARGETS = {family: tuple(kinds) for family, kinds in BOTTLENECK_KINDS.items()}
ADAPTERP_TARGETS = {
    family: tuple(k for k, v in kinds.items() if v == "output") for family, kinds in BOTTLENECK_KINDS.items()
}
_QKV = ("q_proj", "k_proj", "v_proj")
PARALLEL_TARGETS = {
    "llama": _QKV,
    "mistral": _QKV,
    "qwen2": _QKV,
    "opt": _QKV,
    "gptj": _QKV,
    "bloom": ("query_key_value",),
    "gpt_neox": ("query_key_value",),
    "gpt2": ("c_attn",),
}


def bottleneck_placement(model: nn.Module, config: BottleneckConfig) -> dict[str, tuple[nn.Module, str]]:
    """name -> (module, kind) for every target of `config`, kind being "mh", "output" or "parallel".

    Raises ValueError, before anything changes, when a series target is neither kind in the family's table.
    """
    if config.use_parallel_adapter:
        targets = resolve_targets(model, config.target_modules, PARALLEL_TARGETS, "parallel-adapter")
        return {name: (module, "parallel") for name, module in find_targets(model, targets).items()}
    table, what = (ADAPTERP_TARGETS, "AdapterP") if config.use_adapterp else (ADAPTERH_TARGETS, "AdapterH")
    targets = resolve_targets(model, config.target_modules, table, what)
    family = model_type(model)
    kinds = BOTTLENECK_KINDS.get(family)
    if kinds is None:
        raise ValueError(
            f"model_type {family!r} has no bottleneck placement table (known families: "
            f"{sorted(BOTTLENECK_KINDS)}); series adapters need it to tell mh (input) targets from output "
            "targets. use_parallel_adapter=True works on any linear layer"
        )
    placement = {}
    for name, module in find_targets(model, targets).items():
        hits = {kind for key, kind in kinds.items() if matches(name, key)}
        if len(hits) != 1:
            raise ValueError(
                f"target module {name!r} is neither of the mh nor of the output kind in the {family} "
                f"placement table {kinds}; series adapters go on those modules "
                "(or set use_parallel_adapter=True)"
            )
        placement[name] = (module, hits.pop())
    return placement


def _apply_bottleneck(model: nn.Module, config: BottleneckConfig) -> None:
    layers = {
        name: BottleneckAdapter(
            module,
            kind,
            config.bottleneck_size,
            config.non_linearity,
            config.adapter_dropout,
            config.scaling,
            config.init_weights,
        )
        for name, (module, kind) in bottleneck_placement(model, config).items()
    }
    for name, layer in layers.items():
        set_submodule(model, name, layer)


ADAPTER_KINDS[BottleneckConfig] = (
    _apply_bottleneck,
    lambda model: _remove_wrappers(model, BottleneckAdapter),
)


# Prefix tuning: each family's attention module (name suffix) and how the prefix reaches its attention:
# "registry" = transformers' attention registry (fastadapters.prefix registers "fastadapters_prefix");
# "bloom" = a patched BloomAttention.forward (ALiBi attention outside the registry; slower, dense bias).
PREFIX_ATTENTION = {
    "llama": ("self_attn", "registry"),
    "mistral": ("self_attn", "registry"),
    "qwen2": ("self_attn", "registry"),
    "opt": ("self_attn", "registry"),
    "gptj": ("attn", "registry"),
    "gpt2": ("attn", "registry"),
    "gpt_neox": ("attention", "registry"),
    "bloom": ("self_attention", "bloom"),
}
ADAPTER_KINDS[PrefixConfig] = (
    lambda model, config: apply_prefix(model, config, PREFIX_ATTENTION),
    remove_prefix,
)
ADAPTER_KINDS.update(_PROMPT_KINDS)


def apply(model: nn.Module, config) -> nn.Module:
    """Adds the adapter described by `config` to `model` in place, freezes everything else, returns model."""
    if getattr(model, "fastadapters_config", None) is not None:
        raise ValueError("model already has a fastadapters adapter; call fastadapters.remove(model) first")
    if getattr(model, "fastadapters_bank", None) is not None:  # set by AdapterBank(model)
        raise ValueError(
            "model is served by an AdapterBank, and an adapter applied to it would change the bank's "
            "outputs; add the adapter to the bank (bank.load / bank.add) or apply it to a copy of the model"
        )
    if type(config) not in ADAPTER_KINDS:
        raise TypeError(
            f"config must be one of {[c.__name__ for c in ADAPTER_KINDS]}, got {type(config).__name__}"
        )
    add, _ = ADAPTER_KINDS[type(config)]
    was_trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    add(model, config)
    adapter_ids = {id(p) for _, p in adapter_named_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_ids)
    model.fastadapters_config = config
    model._fastadapters_was_trainable = was_trainable
    return model


def remove(model: nn.Module) -> nn.Module:
    """Removes the adapter (unmerging first) and restores the base model and its requires_grad flags."""
    config = _config(model)
    lossy = [
        n
        for n, m in model.named_modules()
        if isinstance(m, LoraLinear) and m.merged and m.merged_base is None
    ]
    if lossy:
        raise ValueError(
            f"the model was merged with keep_base=False ({len(lossy)} layers, e.g. {lossy[0]!r}), so its "
            "base weights cannot be restored exactly; call fastadapters.unmerge(model) first (it subtracts "
            "the adapter again: the weights come back up to rounding in their dtype), then remove"
        )
    _, drop = ADAPTER_KINDS[type(config)]
    drop(model)
    for n, p in model.named_parameters():
        p.requires_grad_(model._fastadapters_was_trainable.get(n, p.requires_grad))
    del model.fastadapters_config, model._fastadapters_was_trainable
    return model


def _config(model: nn.Module):
    config = getattr(model, "fastadapters_config", None)
    if config is None:
        raise ValueError("model has no fastadapters adapter; call fastadapters.apply(model, config) first")
    return config


def _lora_layers(model: nn.Module) -> list[LoraLinear]:
    if not isinstance(_config(model), LoraConfig):
        raise ValueError(f"merge/unmerge apply to LoRA adapters, not {type(_config(model)).__name__}")
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def merge(model: nn.Module, keep_base: bool | str = True) -> nn.Module:
    """Folds scale·BA into each base weight; forward then runs the base layers only.

    keep_base=True keeps a copy of each targeted base weight (its dtype, its device) so that unmerge and
    remove restore it bit for bit; "cpu" keeps the copies in CPU memory; False keeps none (remove then
    refuses until unmerge, which subtracts scale·BA and so restores the weights only up to rounding).
    """
    if not (keep_base is True or keep_base is False or keep_base == "cpu"):
        raise ValueError(f"keep_base must be True, False or 'cpu', got {keep_base!r}")
    for layer in _lora_layers(model):
        layer.merge(keep_base)
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undoes `merge`: the base weights merge kept come back bit for bit (with keep_base=False, scale·BA is
    subtracted, up to rounding); forward then runs base + adapter again."""
    for layer in _lora_layers(model):
        layer.unmerge()
    return model


def adapter_named_parameters(model: nn.Module):
    """(full name, parameter) for every adapter parameter of the model."""
    for mod_name, module in model.named_modules():
        if isinstance(module, AdapterModule):
            for name, p in module.adapter_named_parameters():
                yield (f"{mod_name}.{name}" if mod_name else name), p


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; works on meta-device models."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
