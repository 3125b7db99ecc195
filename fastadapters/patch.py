"""Apply adapters to a HuggingFace model in place, and undo it; the state dict an adapter expects.

Where adapters go (targets, shared-input groups, placements, attention modules) is read from the model by
fastadapters.families (its structure, with per-family overrides). Each adapter type registers
(apply, remove) in ADAPTER_KINDS keyed by its config class; `apply` validates everything before it changes
the model, so a bad config leaves the model untouched. `expected_state` gives the keys and shapes of the
tensors a config puts on a model; io.load and AdapterBank both validate a state dict with `check_state`.
"""

from torch import Tensor, nn

from fastadapters import prefix
from fastadapters.config import BottleneckConfig, LoraConfig, PrefixConfig
from fastadapters.families import (  # noqa: F401  (the tables stay importable from here, as before)
    ADAPTERH_TARGETS,
    ADAPTERP_TARGETS,
    BOTTLENECK_KINDS,
    BOTTLENECK_PLACEMENTS,
    LINEAR_TYPES,
    LORA_TARGETS,
    PARALLEL_TARGETS,
    PREFIX_ATTENTION,
    bottleneck_placement,
    find_targets,
    linear_shape,
    lora_targets,
    matches,
    model_type,
    placement_shape,
    resolve_targets,
    shared_input_groups,
)
from fastadapters.layers import AdapterModule, BottleneckAdapter, LoraGroup, LoraLinear


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _apply_lora(model: nn.Module, config: LoraConfig) -> None:
    layers = {
        name: LoraLinear(base, config.r, config.scale, config.lora_dropout, config.init_lora_weights)
        for name, base in lora_targets(model, config).items()
    }
    for name, layer in layers.items():
        set_submodule(model, name, layer)
    for group in shared_input_groups(model):
        members = [layers[name] for name in group if name in layers]
        if len(members) > 1:
            shared = LoraGroup(members)
            for m in members:
                m.group = shared


def _apply_bottleneck(model: nn.Module, config: BottleneckConfig) -> None:
    layers = {
        name: BottleneckAdapter(
            module,
            placement,
            config.bottleneck_size,
            config.non_linearity,
            config.adapter_dropout,
            config.scaling,
            config.init_weights,
        )
        for name, (module, placement) in bottleneck_placement(model, config).items()
    }
    for name, layer in layers.items():
        set_submodule(model, name, layer)


def _remove_wrappers(model: nn.Module, cls: type) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, cls):
            if isinstance(module, LoraLinear):
                module.unmerge()
            set_submodule(model, name, module.base_layer)


ADAPTER_KINDS = {
    LoraConfig: (_apply_lora, lambda model: _remove_wrappers(model, LoraLinear)),
    BottleneckConfig: (_apply_bottleneck, lambda model: _remove_wrappers(model, BottleneckAdapter)),
    PrefixConfig: (prefix.apply_prefix, prefix.remove_prefix),
    **prefix.ADAPTER_KINDS,
}


# --------------------------------------------------------------------------------------------- schema


def expected_state(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """key -> shape of every tensor that applying `config` adds to `model`: the state dict fastadapters.save
    writes for it. Reads the model's structure only (the model may be bare or already adapted).

    Raises ValueError when the config does not fit the model (a target matching no module, a series
    target without a placement, a family without prefix support), TypeError for an unknown config.
    """
    if isinstance(config, LoraConfig):
        shapes = {}
        for name, module in lora_targets(model, config).items():
            d_in, d_out = linear_shape(module)
            shapes[f"{name}.lora_A.weight"] = (config.r, d_in)
            shapes[f"{name}.lora_B.weight"] = (d_out, config.r)
        return shapes
    if isinstance(config, BottleneckConfig):
        shapes, b = {}, config.bottleneck_size
        for name, (module, placement) in bottleneck_placement(model, config).items():
            a_in, a_out = placement_shape(placement, *linear_shape(module))
            shapes[f"{name}.adapter_down.weight"] = (b, a_in)
            shapes[f"{name}.adapter_up.weight"] = (a_out, b)
            if config.learned_scaling:
                shapes[f"{name}.adapter_scaling"] = (1,)
        return shapes
    if type(config) in ADAPTER_KINDS:
        return prefix.state_shapes(model, config)
    raise TypeError(
        f"config must be one of {[c.__name__ for c in ADAPTER_KINDS]}, got {type(config).__name__}"
    )


def _listed(keys: list[str]) -> str:
    return f"{keys[:5]}{'...' if len(keys) > 5 else ''}"


def check_state(model: nn.Module, config, state: dict, where: str) -> dict[str, tuple[int, ...]]:
    """Raises ValueError, naming the key, unless `state` holds exactly the keys of expected_state(model,
    config), each a floating-point tensor of the expected shape; returns the expected shapes.

    `where` opens every message (e.g. "adapter in out/lora").
    """
    if not isinstance(state, dict):
        raise TypeError(f"{where}: the state must be a dict of tensors, got {type(state).__name__}")
    try:
        expected = expected_state(model, config)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: weights do not match its config: missing {_listed(missing)}, "
            f"unexpected {_listed(unexpected)} (saved for a different base model, or with another config?)"
        )
    for key, shape in expected.items():
        value = state[key]
        if not isinstance(value, Tensor) or not value.is_floating_point():
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{where}: {key} must be a floating-point tensor, got {got}")
        if tuple(value.shape) != shape:
            raise ValueError(
                f"{where}: {key} has shape {tuple(value.shape)}, this model needs {shape} for its config: "
                "saved for a different base model, or with another config?"
            )
    return expected


# --------------------------------------------------------------------------------------------- apply


def check_bare(model: nn.Module) -> None:
    """Raises ValueError when `model` already has a fastadapters adapter, or an AdapterBank serves it."""
    if getattr(model, "fastadapters_config", None) is not None:
        raise ValueError("model already has a fastadapters adapter; call fastadapters.remove(model) first")
    if getattr(model, "fastadapters_bank", None) is not None:  # set by AdapterBank(model)
        raise ValueError(
            "model is served by an AdapterBank, and an adapter applied to it would change the bank's "
            "outputs; add the adapter to the bank (bank.load / bank.add) or apply it to a copy of the model"
        )


def apply(model: nn.Module, config) -> nn.Module:
    """Adds the adapter described by `config` to `model` in place, freezes everything else, returns model."""
    check_bare(model)
    if type(config) not in ADAPTER_KINDS:
        raise TypeError(
            f"config must be one of {[c.__name__ for c in ADAPTER_KINDS]}, got {type(config).__name__}"
        )
    add, _ = ADAPTER_KINDS[type(config)]
    was_trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    add(model, config)
    adapter_params = {id(p) for _, p in adapter_named_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapter_params)
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
