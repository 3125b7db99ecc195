"""What fastadapters knows about each model family, in one place (as Liger-Kernel's monkey_patch.py).

A family is a HuggingFace `config.model_type`. Per family: LoRA's default targets, the linear layers that
share one input (their LoRAs share one shrink), where bottleneck adapters sit, and which attention modules
prefix tuning reaches and how. Around the tables, the few functions that read a model's structure: its
family, its linear layers and their shapes, its attention layers' key/value shape, and the targets and
placements a config resolves to. Adding a family means adding rows here, not code.

Vocabulary: a *placement* is where an adapter sits on a linear layer ("mh": on its input, "output": on
its output, "parallel": beside it); a shared-input *group* is a set of linear layers that read one input
(q/k/v, gate/up); *adapter_ids* say which adapter each row or token uses.
"""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# The linear layer types adapters wrap: nn.Linear and HF's transposed Conv1D (GPT-2).
LINEAR_TYPES = (nn.Linear, Conv1D)

_LLAMA_LIKE = ("llama", "mistral", "qwen2")
_QKV = ("q_proj", "k_proj", "v_proj")

# Families whose attention input projection is one fused q/k/v layer: it is their attention target.
_FUSED_QKV = {"bloom": ("query_key_value",), "gpt_neox": ("query_key_value",), "gpt2": ("c_attn",)}

# Default LoRA targets of LLM-Adapters' finetune script (GPT-2 has no q/v split: its fused c_attn).
LORA_TARGETS = {**dict.fromkeys((*_LLAMA_LIKE, "opt", "gptj"), ("q_proj", "v_proj")), **_FUSED_QKV}

# Linear layers that read the same input tensor; their LoRAs share one shrink (the grouped op).
SHARED_INPUT_GROUPS = {
    **dict.fromkeys(_LLAMA_LIKE, (_QKV, ("gate_proj", "up_proj"))),
    **dict.fromkeys(("opt", "gptj"), (_QKV,)),
}

# Bottleneck placements, after LLM-Adapters (peft/src/peft/tuners/bottleneck.py, its adapter-type
# mapping): an "mh" target gets the adapter on its input, an "output" target on its output, a "parallel"
# adapter sits beside any target. LLM-Adapters lists llama, bloom, gptj and opt; the other families follow
# the same rule: the MLP's input projections are "mh", its output projection "output". Keys match a
# module's name or a dotted suffix of it (GPT-2's attention has a c_proj too, hence "mlp.c_proj").
PLACEMENTS = ("mh", "output", "parallel")
BOTTLENECK_PLACEMENTS = {
    **dict.fromkeys(_LLAMA_LIKE, {"gate_proj": "mh", "up_proj": "mh", "down_proj": "output"}),
    "bloom": {"dense_h_to_4h": "mh", "dense_4h_to_h": "output"},
    "gpt_neox": {"dense_h_to_4h": "mh", "dense_4h_to_h": "output"},
    "gptj": {"fc_in": "mh", "fc_out": "output"},
    "opt": {"fc1": "mh", "fc2": "output"},
    "gpt2": {"mlp.c_fc": "mh", "mlp.c_proj": "output"},
}
BOTTLENECK_KINDS = BOTTLENECK_PLACEMENTS  # the former name
# Default targets (LLM-Adapters peft/src/peft/mapping.py): AdapterH takes every module of the placement
# table, AdapterP the output placement, the parallel adapter the attention projections. (The paper's best
# parallel runs pass target_modules=["up_proj", "down_proj"] explicitly.)
ADAPTERH_TARGETS = {family: tuple(table) for family, table in BOTTLENECK_PLACEMENTS.items()}
ADAPTERP_TARGETS = {
    family: tuple(k for k, v in table.items() if v == "output")
    for family, table in BOTTLENECK_PLACEMENTS.items()
}
PARALLEL_TARGETS = {**dict.fromkeys((*_LLAMA_LIKE, "opt", "gptj"), _QKV), **_FUSED_QKV}

# Prefix tuning: each family's attention module (name suffix) and how the prefix reaches its attention:
# "registry" = transformers' attention registry (fastadapters.prefix registers "fastadapters_prefix");
# "bloom" = a patched BloomAttention.forward (ALiBi attention outside the registry; slower, dense bias).
PREFIX_ATTENTION = {
    **dict.fromkeys((*_LLAMA_LIKE, "opt"), ("self_attn", "registry")),
    "gptj": ("attn", "registry"),
    "gpt2": ("attn", "registry"),
    "gpt_neox": ("attention", "registry"),
    "bloom": ("self_attention", "bloom"),
}


# ------------------------------------------------------------------------------------------ structure


def model_type(model: nn.Module) -> str | None:
    """The model's family: its HF config.model_type, or None."""
    return getattr(getattr(model, "config", None), "model_type", None)


def linear_shape(base: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a transposed HF Conv1D."""
    if isinstance(base, Conv1D):
        return base.weight.shape[0], base.weight.shape[1]
    return base.in_features, base.out_features


def base_weight(base: nn.Module) -> torch.Tensor:
    """The frozen weight of an nn.Linear or HF Conv1D as [d_out, d_in] (a transposed view for Conv1D)."""
    w = base.weight
    return w.T if isinstance(base, Conv1D) else w


def placement_shape(placement: str, d_in: int, d_out: int) -> tuple[int, int]:
    """(features in, features out) of a bottleneck adapter at `placement` on a d_in -> d_out layer."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    return {"mh": (d_in, d_in), "output": (d_out, d_out), "parallel": (d_in, d_out)}[placement]


def unwrap(module: nn.Module) -> nn.Module:
    """The layer under adapter wrappers (LoraLinear, BottleneckAdapter, BankLinear: their `base_layer`)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def shared_input_groups(model: nn.Module) -> tuple:
    """The family's shared-input groups: tuples of leaf names whose layers read one input."""
    return SHARED_INPUT_GROUPS.get(model_type(model), ())


def attention_paths(model: nn.Module, table: dict = PREFIX_ATTENTION) -> tuple[list[str], str]:
    """(paths of the attention modules in layer order, prefix route) for prefix tuning on this family."""
    family = model_type(model)
    if family not in table:
        raise ValueError(f"prefix tuning supports model_type in {sorted(table)}, got {family!r}")
    suffix, route = table[family]
    paths = [n for n, _ in model.named_modules() if n == suffix or n.endswith("." + suffix)]
    if not paths:
        raise ValueError(f"no attention module named '*.{suffix}' in {type(model).__name__}")
    return paths, route


def kv_shape(model: nn.Module, attn: nn.Module) -> tuple[int, int]:
    """(key/value heads, head_dim) of the model's attention module `attn`."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or cfg.hidden_size // heads
    return int(kv_heads), int(head_dim)


# ------------------------------------------------------------------------------------------ targets


def resolve_targets(model: nn.Module, targets, table: dict, what: str) -> list[str]:
    """The target names: the given list, else the family's default from `table`."""
    if targets is not None:
        return list(targets)
    family = model_type(model)
    if family not in table:
        raise ValueError(
            f"model_type {family!r} has no default {what} targets (known families: {sorted(table)}); "
            "pass target_modules explicitly"
        )
    return list(table[family])


def matches(name: str, target: str) -> bool:
    """Whether module name `name` is `target` or ends with '.' + target."""
    return name == target or name.endswith("." + target)


def find_targets(model: nn.Module, targets: list[str], types=LINEAR_TYPES) -> dict[str, nn.Module]:
    """name -> module for every module matching a target (under any adapter wrapper: the wrapped layer);
    each target must match at least one module."""
    found, unmatched = {}, []
    named = [(n, m) for n, m in model.named_modules() if n and n.rpartition(".")[2] != "base_layer"]
    for target in targets:
        hits = [(n, unwrap(m)) for n, m in named if matches(n, target)]
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
        leaves = sorted({n.rsplit(".", 1)[-1] for n, m in named if isinstance(unwrap(m), LINEAR_TYPES)})
        raise ValueError(
            f"target_modules {unmatched} match no module of the model; its linear layers are {leaves}"
        )
    return found


def lora_targets(model: nn.Module, config) -> dict[str, nn.Module]:
    """name -> linear layer for every target of a LoraConfig on `model`."""
    return find_targets(model, resolve_targets(model, config.target_modules, LORA_TARGETS, "LoRA"))


def bottleneck_placement(model: nn.Module, config) -> dict[str, tuple[nn.Module, str]]:
    """name -> (linear layer, placement) for every target of a BottleneckConfig, placement being "mh",
    "output" or "parallel".

    Raises ValueError, before anything changes, when a series target has no placement in the family's table.
    """
    if config.use_parallel_adapter:
        targets = resolve_targets(model, config.target_modules, PARALLEL_TARGETS, "parallel-adapter")
        return {name: (module, "parallel") for name, module in find_targets(model, targets).items()}
    table, what = (ADAPTERP_TARGETS, "AdapterP") if config.use_adapterp else (ADAPTERH_TARGETS, "AdapterH")
    targets = resolve_targets(model, config.target_modules, table, what)
    family = model_type(model)
    table = BOTTLENECK_PLACEMENTS.get(family)
    if table is None:
        raise ValueError(
            f"model_type {family!r} has no bottleneck placement table (known families: "
            f"{sorted(BOTTLENECK_PLACEMENTS)}); series adapters need it to tell mh (input) targets from "
            "output targets. use_parallel_adapter=True works on any linear layer"
        )
    placement = {}
    for name, module in find_targets(model, targets).items():
        hits = {where for key, where in table.items() if matches(name, key)}
        if len(hits) != 1:
            raise ValueError(
                f"target module {name!r} is neither of the mh nor of the output kind in the {family} "
                f"placement table {table}; series adapters go on those modules "
                "(or set use_parallel_adapter=True)"
            )
        placement[name] = (module, hits.pop())
    return placement
