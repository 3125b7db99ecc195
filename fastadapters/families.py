"""Where adapters go on a model: read from the model's structure, with per-family overrides (one place).

The placement of every adapter kind is derived from the model itself (fastadapters.structure): its decoder
layers, each layer's attention block and MLP with their linear layers by role, and which linear layers
read one input. This works on any `*ForCausalLM` whose layers follow the usual shape:
- LoRA's default targets are LLM-Adapters' choice, the query and value projections (a fused qkv layer
  when the model has one); `target_modules="all-linear"` is PEFT's: every linear layer but the output head;
- shared-input groups (q/k/v, gate/up: their LoRAs share one shrink) are seen in a traced forward;
- bottleneck adapters (LLM-Adapters): an MLP input projection gets a series adapter on its input ("mh"),
  an MLP output projection on its output ("output"); AdapterH's default targets are the MLP's projections,
  AdapterP's its output projections, the parallel adapter's the attention input projections;
- prefix tuning reaches every attention block that calls transformers' attention interface.
The tables below hold only what differs from what the structure gives (keyed by `config.model_type`).

Vocabulary: a *placement* is where an adapter sits on a linear layer ("mh": on its input, "output": on
its output, "parallel": beside it); a shared-input *group* is a set of linear layers that read one input
(q/k/v, gate/up); *adapter_ids* say which adapter each row or token uses.
"""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from fastadapters.structure import LINEAR_TYPES, Structure, describe, read_structure

PLACEMENTS = ("mh", "output", "parallel")

# Overrides, per model_type, of what the structure gives (none needed for LoRA and bottleneck adapters on
# the families checked: tests/test_families.py pins the eight original families' placements).
LORA_TARGETS: dict[str, tuple[str, ...]] = {}  # default LoRA targets (names or dotted suffixes)
BOTTLENECK_PLACEMENTS: dict[str, dict[str, str]] = {}  # name or dotted suffix -> "mh" / "output"
BOTTLENECK_KINDS = BOTTLENECK_PLACEMENTS  # the former name
ADAPTERH_TARGETS: dict[str, tuple[str, ...]] = {}
ADAPTERP_TARGETS: dict[str, tuple[str, ...]] = {}
PARALLEL_TARGETS: dict[str, tuple[str, ...]] = {}
# Prefix tuning: (attention module name suffix, route) where the attention interface is not the way in:
# "bloom" = a patched BloomAttention.forward (ALiBi attention outside the interface; a dense bias).
PREFIX_ATTENTION: dict[str, tuple[str, str]] = {"bloom": ("self_attention", "bloom")}
# Attention-function arguments the prefix attention op does not reproduce: prefix tuning refuses them, named.
UNSUPPORTED_ATTENTION = {
    "softcap": "attention logit soft-capping (config.attn_logit_softcapping; None turns it off)",
    "s_aux": "attention sinks (learned per-head sink logits)",
    "sinks": "attention sinks (learned per-head sink logits)",
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


def structure(model: nn.Module) -> Structure:
    """The model's structure (fastadapters.structure.read_structure); ValueError when no decoder layers."""
    found = read_structure(model)
    if not found.layers:
        raise ValueError(
            f"cannot read the structure of {type(model).__name__} (model_type {model_type(model)!r}): "
            "no nn.ModuleList of repeated layers holding linear layers (the decoder layers) was found; "
            f"its linear layers are {list(found.linears)[:24]}; pass target_modules explicitly (LoRA, "
            "parallel adapter), or BottleneckConfig(target_modules=..., placements={name: 'mh' | 'output'}) "
            "for series adapters"
        )
    return found


def shared_input_groups(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """Groups of full module names whose linear layers read one input tensor (seen in a traced forward)."""
    return read_structure(model).groups


def attention_paths(model: nn.Module, table: dict = PREFIX_ATTENTION) -> tuple[list[str], str]:
    """(paths of the attention modules in layer order, prefix route) for prefix tuning on this model:
    route "registry" (transformers' attention interface) or a `table` override ("bloom").

    Raises ValueError, naming the reason, when the model's attention cannot take a prefix.
    """
    family = model_type(model)
    if family in table:
        suffix, route = table[family]
        paths = [n for n, _ in model.named_modules() if matches(n, suffix)]
        if not paths:
            raise ValueError(f"no attention module named '*.{suffix}' in {type(model).__name__}")
        return paths, route
    found = structure(model)
    if not found.attention:
        raise ValueError(
            f"prefix tuning found no attention block in the decoder layers of {type(model).__name__}: it "
            "needs attention modules (a class named *Attention*) calling transformers' attention interface. "
            f"Found: {describe(found)}"
        )
    outside = [b.path for b in found.attention if not b.interface]
    if outside:
        cls = type(model.get_submodule(outside[0])).__name__
        raise ValueError(
            f"prefix tuning needs attention through transformers' attention interface "
            f"(ALL_ATTENTION_FUNCTIONS); {type(model).__name__}'s {cls} ({len(outside)} of "
            f"{len(found.attention)} attention blocks, e.g. {outside[0]!r}) computes attention itself "
            f"(traced forward: {found.trace})"
        )
    for _, _, features in found.attention_calls.values():
        for feature in features:
            if feature in UNSUPPORTED_ATTENTION:
                raise ValueError(
                    f"prefix tuning does not support {UNSUPPORTED_ATTENTION[feature]} ({feature!r}, used by "
                    f"{type(model).__name__}'s attention): the prefix attention op does not compute it"
                )
    # Every module that calls the interface gets a prefix (also attention outside the decoder layers found).
    return list(found.attention_calls), "registry"


def kv_shape(model: nn.Module, attn: nn.Module) -> tuple[int, int]:
    """(key/value heads, head_dim) of the model's attention module `attn`: as the traced forward saw them,
    else from the config."""
    for path, (kv_heads, head_dim, _) in read_structure(model).attention_calls.items():
        if model.get_submodule(path) is attn:
            return kv_heads, head_dim
    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None) or cfg.hidden_size // heads
    return int(kv_heads), int(head_dim)


# ------------------------------------------------------------------------------------------ targets

ALL_LINEAR = "all-linear"


def matches(name: str, target: str) -> bool:
    """Whether module name `name` is `target` or ends with '.' + target."""
    return name == target or name.endswith("." + target)


def _roles(model: nn.Module, what: str) -> list[str]:
    """Full module names of a structural default: "lora" (query and value projections), "adapterh"
    (the MLP projections), "adapterp" (the MLP output projections), "parallel" (attention inputs)."""
    found = structure(model)
    names: list[str] = []
    if what in ("lora", "parallel"):
        if not found.attention:
            raise ValueError(
                f"no attention block found in {type(model).__name__} (a submodule of each decoder layer "
                f"whose class is named *Attention*); pass target_modules explicitly. Found: {describe(found)}"
            )
        for block in found.attention:
            picked = (block.query, block.value) if what == "lora" else block.inputs
            if not picked or None in picked:
                raise ValueError(
                    f"cannot tell the query and value projections of {block.path!r} (its input projections: "
                    f"{[found.relative(n) for n in block.inputs]}); pass target_modules explicitly. "
                    f"Found: {describe(found)}"
                )
            names += [n for n in picked if n not in names]
        return names
    for block in found.mlp:
        names += list(block.outputs) if what == "adapterp" else [*block.inputs, *block.outputs]
    if not names:
        raise ValueError(
            f"series adapters sit on the MLP's linear projections, and {type(model).__name__} has no MLP "
            "with linear layers (MoE experts stored as 3-D parameters are no linear layers); use "
            "use_parallel_adapter=True or LoRA, or pass target_modules with placements={name: 'mh' | "
            f"'output'}}. Found: {describe(found)}"
        )
    return names


def resolve_targets(model: nn.Module, targets, table: dict, what: str) -> list[str]:
    """The target names: the given list ("all-linear": every linear layer but the output head, as PEFT),
    else the family's override from `table`, else the structural default for `what` ("lora", "adapterh",
    "adapterp", "parallel")."""
    if targets is not None:
        if list(targets) == [ALL_LINEAR]:
            found = read_structure(model)
            return [n for n in found.linears if n not in found.head]
        return list(targets)
    family = model_type(model)
    if family in table:
        return list(table[family])
    return _roles(model, what)


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
            f" (or pass target_modules='{ALL_LINEAR}')"
        )
    return found


def lora_targets(model: nn.Module, config) -> dict[str, nn.Module]:
    """name -> linear layer for every target of a LoraConfig on `model`."""
    return find_targets(model, resolve_targets(model, config.target_modules, LORA_TARGETS, "lora"))


def series_placements(model: nn.Module) -> dict[str, str]:
    """name (or dotted suffix) -> "mh" / "output" for series bottleneck adapters: the family's override,
    else every MLP input projection "mh" and every MLP output projection "output"."""
    family = model_type(model)
    if family in BOTTLENECK_PLACEMENTS:
        return dict(BOTTLENECK_PLACEMENTS[family])
    found = read_structure(model)
    table = {}
    for block in found.mlp:
        table.update(dict.fromkeys(block.inputs, "mh"))
        table.update(dict.fromkeys(block.outputs, "output"))
    return table


def bottleneck_placement(model: nn.Module, config) -> dict[str, tuple[nn.Module, str]]:
    """name -> (linear layer, placement) for every target of a BottleneckConfig, placement being "mh",
    "output" or "parallel". `config.placements` (name or dotted suffix -> placement; what fastadapters.save
    writes) overrides the structure's.

    Raises ValueError, before anything changes, when a series target has no placement.
    """
    given = getattr(config, "placements", None)
    if config.use_parallel_adapter:
        targets = config.target_modules
        if targets is None and given:
            targets = list(given)
        targets = resolve_targets(model, targets, PARALLEL_TARGETS, "parallel")
        return {name: (module, "parallel") for name, module in find_targets(model, targets).items()}
    if config.target_modules is None and given:
        targets = list(given)
    elif config.use_adapterp:
        targets = resolve_targets(model, config.target_modules, ADAPTERP_TARGETS, "adapterp")
    else:
        targets = resolve_targets(model, config.target_modules, ADAPTERH_TARGETS, "adapterh")
    table = dict(given) if given else series_placements(model)
    placement = {}
    for name, module in find_targets(model, targets).items():
        hits = {where for key, where in table.items() if matches(name, key)}
        if len(hits) != 1:
            found = read_structure(model)
            kinds = sorted({f"{found.relative(k)}: {v}" for k, v in table.items()})
            raise ValueError(
                f"target module {name!r} is neither of the mh nor of the output kind in the placement table "
                f"of {type(model).__name__} {kinds}; series adapters go on the MLP's input (mh) and output "
                "projections (or set use_parallel_adapter=True, or pass placements={name: 'mh' | 'output'})"
            )
        placement[name] = (module, hits.pop())
    return placement


def saved_placements(model: nn.Module, placement: dict[str, tuple[nn.Module, str]]) -> dict[str, str]:
    """The placements of bottleneck_placement's result as written into a saved config: names relative to
    their decoder layer ("mlp.up_proj": "mh") when every layer agrees, else full names."""
    found = read_structure(model)
    relative: dict[str, str] = {}
    for name, (_, where) in placement.items():
        short = found.relative(name)
        if relative.setdefault(short, where) != where:
            return {name: where for name, (_, where) in sorted(placement.items())}
    full = {name: where for name, (_, where) in placement.items()}
    # Relative names must pick out exactly the placed modules again.
    again = {
        n for n, _ in model.named_modules() if "base_layer" not in n and any(matches(n, k) for k in relative)
    }
    if again != set(full):
        return dict(sorted(full.items()))
    return dict(sorted(relative.items()))
