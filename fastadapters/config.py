"""Adapter configs with the LLM-Adapters / PEFT field names. Each serialises to a JSON-safe dict."""

import dataclasses
import math
from dataclasses import dataclass, field


def _check_targets(target_modules):
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be None or a non-empty list of module names, got {target_modules!r}")
    return targets


@dataclass
class LoraConfig:
    """LoRA: y = W x + b + (lora_alpha / r) · B(A(dropout(x))); A kaiming-uniform, B zeros (as PEFT).

    target_modules=None takes the model family's default (LLM-Adapters: q_proj,v_proj on Llama).
    Names match a module's full name or any dotted suffix of it. use_rslora scales by alpha/sqrt(r).
    """

    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: list[str] | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool = True
    adapter_type: str = field(default="lora", init=False)

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r (the LoRA rank) must be an integer >= 1, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be a positive number, got {self.lora_alpha!r}")
        if not isinstance(self.lora_dropout, (int, float)) or not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias != "none":
            raise ValueError(f"bias must be 'none' (trainable biases are not supported), got {self.bias!r}")
        self.target_modules = _check_targets(self.target_modules)

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


CONFIG_TYPES: dict[str, type] = {"lora": LoraConfig}


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(data: dict):
    """Rebuilds a config saved by `config_to_dict`; unknown types or fields raise ValueError."""
    if not isinstance(data, dict) or data.get("adapter_type") not in CONFIG_TYPES:
        kind = data.get("adapter_type") if isinstance(data, dict) else data
        raise ValueError(f"adapter_type must be one of {sorted(CONFIG_TYPES)}, got {kind!r}")
    cls = CONFIG_TYPES[data["adapter_type"]]
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = set(data) - names - {"adapter_type"}
    if unknown:
        raise ValueError(f"unknown fields for {cls.__name__}: {sorted(unknown)}")
    return cls(**{k: v for k, v in data.items() if k in names})
