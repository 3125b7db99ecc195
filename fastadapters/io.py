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

from fastadapters.config import LoraConfig, config_from_dict, config_to_dict
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


def save(model: nn.Module, directory: str) -> None:
    """Writes the model's adapter to `directory` as fastadapters_config.json + adapter.safetensors."""
    config = _config(model)
    os.makedirs(directory, exist_ok=True)
    save_file(adapter_state_dict(model), os.path.join(directory, WEIGHTS_NAME))
    meta = {"format_version": 1, "config": config_to_dict(config), "base_model": _base_signature(model)}
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(meta, f, indent=2)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter config not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"adapter config {path} is not valid JSON: {exc}") from None


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """Loads a safetensors file, turning a missing, truncated or corrupted file into a clear error."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter weights not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"adapter weights {path} are truncated or corrupted: {exc}") from None


def read_adapter(directory: str):
    """(config, state dict, base-model signature) of a fastadapters adapter folder; the model is untouched."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    meta = _read_json(os.path.join(directory, CONFIG_NAME))
    if not isinstance(meta, dict) or "config" not in meta:
        raise ValueError(f"{os.path.join(directory, CONFIG_NAME)} has no 'config' entry")
    config = config_from_dict(meta["config"])
    state = read_weights(os.path.join(directory, WEIGHTS_NAME))
    return config, state, meta.get("base_model", {})


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


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copies `state` into the model's adapter parameters; keys and shapes must be exactly those of
    fastadapters.patch.expected_state for the model's adapter config."""
    check_state(model, _config(model), state, f"adapter in {source}")
    _fill(model, state)


def _apply_and_fill(model: nn.Module, config, state: dict, source: str) -> nn.Module:
    """Checks `state` against `config` on the bare model, then applies the config and fills it in."""
    check_bare(model)
    check_state(model, config, state, f"adapter in {source}")
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
    cfg = _read_json(os.path.join(directory, PEFT_CONFIG_NAME))
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
    modules = sorted({k.rsplit(".", 2)[0] for k in state})
    config = LoraConfig(
        r=int(cfg["r"]),
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=float(cfg.get("lora_dropout", 0.0)),
        target_modules=modules,
        use_rslora=bool(cfg.get("use_rslora", False)),
    )
    return config, state


def load_peft(model: nn.Module, directory: str) -> nn.Module:
    """Applies a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to `model`."""
    config, state = read_peft(directory)
    return _apply_and_fill(model, config, state, directory)
