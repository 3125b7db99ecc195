"""Adapter files: safetensors weights plus a JSON config, in fastadapters' format and in PEFT's.

fastadapters format (a folder):  fastadapters_config.json, adapter.safetensors (keys are module paths,
    e.g. model.layers.0.self_attn.q_proj.lora_A.weight).
PEFT LoRA format (a folder):     adapter_config.json, adapter_model.safetensors (keys prefixed
    base_model.model. as PeftModel.save_pretrained writes them).
Nothing is ever unpickled. Loading reads and checks the files before touching the model, and if the
weights do not fit, the adapter is removed again, so the model is left as it was.
"""

import json
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fastadapters.config import BottleneckConfig, LoraConfig, _check_targets, config_from_dict, config_to_dict
from fastadapters.families import saved_placements
from fastadapters.layers import BottleneckAdapter
from fastadapters.patch import _config, adapter_named_parameters, apply, check_bare, check_state, remove

CONFIG_NAME = "fastadapters_config.json"
WEIGHTS_NAME = "adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _base_signature(model: nn.Module) -> dict:
    cfg = getattr(model, "config", None)
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    return {k: getattr(cfg, k, None) for k in keys if getattr(cfg, k, None) is not None}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed by module path (detached, contiguous)."""
    _config(model)
    return {name: p.detach().contiguous() for name, p in adapter_named_parameters(model)}


def saved_config(model: nn.Module) -> dict:
    """The adapter config as `save` writes it: a bottleneck config also records where each adapter sits
    (`placements`), so that load places it the same way."""
    config = _config(model)
    saved = config_to_dict(config)
    if isinstance(config, BottleneckConfig):
        placed = {n: (m, m.placement) for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
        saved["placements"] = saved_placements(model, placed)
    return saved


def save(model: nn.Module, directory: str) -> None:
    """Writes the model's adapter to `directory` as fastadapters_config.json + adapter.safetensors."""
    os.makedirs(directory, exist_ok=True)
    save_file(adapter_state_dict(model), os.path.join(directory, WEIGHTS_NAME))
    meta = {"format_version": 1, "config": saved_config(model), "base_model": _base_signature(model)}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter config not found: {path}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"adapter config {path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise type(exc)(exc.errno, f"adapter config {path} cannot be read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ValueError(f"adapter config {path} must hold a JSON object, got a {type(data).__name__}")
    return data


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Loads a safetensors file, turning a missing, truncated or corrupted file into a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter weights not found: {path}")
    try:  # an unreadable file (permissions) is not a corrupted one: say so before safetensors reads it
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise type(exc)(exc.errno, f"adapter weights {path} cannot be read: {exc.strerror}") from None
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"adapter weights {path} are truncated or corrupted: {exc}") from None


def read_adapter(directory: str):
    """(config, state dict, base-model signature) of a fastadapters adapter folder; the model is untouched."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    path = os.path.join(directory, CONFIG_NAME)
    meta = _read_json(path)
    if "config" not in meta:
        raise ValueError(f"{path} has no 'config' entry")
    try:
        config = config_from_dict(meta["config"])
    except ValueError as exc:
        raise ValueError(f"adapter config {path}, field 'config': {exc}") from None
    base = meta.get("base_model", {})
    if not isinstance(base, dict) or not all(
        isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in base.values()
    ):
        raise ValueError(
            f"adapter config {path}, field 'base_model' must be an object of the base model's "
            f"model_type, hidden_size, ... (strings and numbers), got {base!r}"
        )
    state = read_weights(os.path.join(directory, WEIGHTS_NAME))
    return config, state, base


def check_base(model: nn.Module, saved: dict, directory: str) -> None:
    """Raises ValueError when the adapter was saved for a different base model."""
    ours = _base_signature(model)
    diff = {k: (v, ours[k]) for k, v in saved.items() if k in ours and ours[k] != v}
    if diff:
        detail = ", ".join(f"{k}: adapter {a!r} vs model {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"adapter in {directory} was saved for a different base model ({detail})")


def _fill(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in adapter_named_parameters(model):
            p.copy_(state[name])


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Raises ValueError naming the tensors of `state` that hold NaN or inf."""
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(
            f"adapter weights in {source} hold NaN or inf in {len(bad)} tensor(s): {bad[:5]}"
            f"{'...' if len(bad) > 5 else ''}"
        )


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copies `state` into the model's adapter parameters; keys and shapes must be exactly those of
    fastadapters.patch.expected_state for the model's adapter config."""
    check_state(model, _config(model), state, f"adapter in {source}")
    _fill(model, state)


def _apply_and_fill(model: nn.Module, config, state: dict, source: str) -> nn.Module:
    """Checks `state` against `config` on the bare model, then applies the config and fills it in."""
    check_bare(model)
    check_state(model, config, state, f"adapter in {source}")
    check_finite(state, source)
    apply(model, config)
    try:
        _fill(model, state)
    except Exception:
        remove(model)
        raise
    return model


def load(model: nn.Module, directory: str) -> nn.Module:
    """Applies the saved config to an unpatched model, then loads the saved weights into it."""
    config, state, base = read_adapter(directory)
    check_base(model, base, directory)
    return _apply_and_fill(model, config, state, directory)


def save_peft(model: nn.Module, directory: str) -> None:
    """Writes the LoRA adapter in PEFT's layout, loadable by peft.PeftModel.from_pretrained."""
    config = _config(model)
    if not isinstance(config, LoraConfig):
        raise ValueError(f"PEFT export supports LoRA adapters only, not {type(config).__name__}")
    state = {PEFT_PREFIX + k: v for k, v in adapter_state_dict(model).items()}
    from fastadapters.layers import LoraLinear

    adapted = {n for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    targets = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    # peft matches target names by suffix: leaf names are what peft itself writes, but when a leaf name
    # also names modules without an adapter (GPT-2's attn.c_proj and mlp.c_proj), list full paths instead.
    if any(n.rsplit(".", 1)[-1] in targets and n not in adapted for n, _ in model.named_modules()):
        targets = sorted(adapted)

    fan_in_fan_out = any(m.fan_in_fan_out for m in model.modules() if isinstance(m, LoraLinear))
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    os.makedirs(directory, exist_ok=True)
    save_file(state, os.path.join(directory, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(directory, PEFT_CONFIG_NAME), "w") as f:
        json.dump(peft_config, f, indent=2)


def read_peft(directory: str):
    """(LoraConfig, state dict keyed by module path) of a PEFT LoRA folder; unsupported options raise."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    path = os.path.join(directory, PEFT_CONFIG_NAME)
    cfg = _read_json(path)
    if cfg.get("peft_type") != "LORA":
        raise ValueError(
            f"{directory} holds a {cfg.get('peft_type')!r} adapter; only PEFT LoRA can be loaded"
        )
    for key, off in (
        ("use_dora", False),
        ("rank_pattern", {}),
        ("alpha_pattern", {}),
        ("modules_to_save", None),
    ):
        if cfg.get(key) not in (off, None) and cfg.get(key) != off:
            raise ValueError(f"PEFT option {key}={cfg[key]!r} in {directory} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"PEFT option bias={cfg['bias']!r} in {directory} is not supported")
    missing = [k for k in ("r", "lora_alpha") if k not in cfg]
    if missing:
        raise ValueError(f"PEFT adapter config {path} has no field {missing[0]!r} (the LoRA rank / alpha)")
    try:
        targets = cfg.get("target_modules")
        if targets is not None and not isinstance(targets, str):  # PEFT also allows one regex string
            _check_targets(targets)
        config = LoraConfig(  # the raw values: LoraConfig checks their types (no int()/bool() coercion)
            r=cfg["r"],
            lora_alpha=cfg["lora_alpha"],
            lora_dropout=cfg.get("lora_dropout", 0.0),
            use_rslora=cfg.get("use_rslora", False),
        )
    except ValueError as exc:
        raise ValueError(f"PEFT adapter config {path}: {exc}") from None
    raw = read_weights(os.path.join(directory, PEFT_WEIGHTS_NAME))
    state = {}
    for key, value in raw.items():
        if not key.startswith(PEFT_PREFIX) or ".lora_" not in key:
            raise ValueError(
                f"unexpected key {key!r} in {directory}; expected base_model.model.<path>.lora_A/B"
            )
        name = key[len(PEFT_PREFIX) :]
        # PEFT may keep the adapter name in the key (lora_A.default.weight); our layout drops it.
        name = name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        state[name] = value
    if not state:
        raise ValueError(f"{os.path.join(directory, PEFT_WEIGHTS_NAME)} holds no LoRA tensors")
    config.target_modules = _check_targets(sorted({k.rsplit(".", 2)[0] for k in state}))
    return config, state


def load_peft(model: nn.Module, directory: str) -> nn.Module:
    """Applies a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to `model`."""
    config, state = read_peft(directory)
    return _apply_and_fill(model, config, state, directory)
