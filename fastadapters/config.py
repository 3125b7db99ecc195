"""Adapter configs with the LLM-Adapters / PEFT field names. Each serialises to a JSON-safe dict."""

import dataclasses
import math
from dataclasses import dataclass, field

from fastadapters.kernels import ACTIVATIONS as BOTTLENECK_ACTIVATIONS


def _check_targets(target_modules):
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    targets = list(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            f"target_modules must be None or a non-empty list of module names, got {target_modules!r}"
        )
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
        if (
            not isinstance(self.lora_alpha, (int, float))
            or not math.isfinite(self.lora_alpha)
            or self.lora_alpha <= 0
        ):
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


@dataclass
class BottleneckConfig:
    """Bottleneck adapters of LLM-Adapters: s · up(f(down(dropout(x)))) with down d→bottleneck_size, up back.

    Series (the default, AdapterH): each target's kind comes from its family's placement table: "mh" targets
    (Llama gate_proj, up_proj) get the adapter on their input, "output" targets (down_proj) on their output.
    use_adapterp=True (AdapterP) and use_parallel_adapter=True (beside each target: W x + b + adapter(x))
    change the default targets; target_modules=None takes them from the family's table. scaling is a float
    or "learned" (a trainable scalar starting at 1). init_weights: "bert" draws both projections from
    N(0, 0.02); "mam_adapter" uses kaiming-uniform down and zero up. Projections have no bias.
    """

    bottleneck_size: int = 256
    non_linearity: str = "tanh"
    adapter_dropout: float = 0.0
    scaling: float | str = 1.0
    use_parallel_adapter: bool = False
    use_adapterp: bool = False
    target_modules: list[str] | None = None
    init_weights: str = "bert"
    adapter_type: str = field(default="bottleneck", init=False)

    def __post_init__(self):
        size = self.bottleneck_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"bottleneck_size must be an integer >= 1, got {size!r}")
        if self.non_linearity not in BOTTLENECK_ACTIVATIONS:
            acts = BOTTLENECK_ACTIVATIONS
            raise ValueError(f"non_linearity must be one of {acts}, got {self.non_linearity!r}")
        p = self.adapter_dropout
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
            raise ValueError(f"adapter_dropout must be in [0, 1), got {p!r}")
        s = self.scaling
        if isinstance(s, str):
            if s != "learned":
                raise ValueError(f"scaling must be a finite number or 'learned', got {s!r}")
        elif isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"scaling must be a finite number or 'learned', got {s!r}")
        else:
            self.scaling = float(s)
        for flag in ("use_parallel_adapter", "use_adapterp"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.use_parallel_adapter and self.use_adapterp:
            raise ValueError(
                "use_parallel_adapter and use_adapterp are exclusive: a parallel adapter sits beside each "
                "target, AdapterP is a series adapter after the MLP; set one of them"
            )
        if self.init_weights not in ("bert", "mam_adapter"):
            raise ValueError(f"init_weights must be 'bert' or 'mam_adapter', got {self.init_weights!r}")
        self.target_modules = _check_targets(self.target_modules)

    @property
    def learned_scaling(self) -> bool:
        return self.scaling == "learned"


CONFIG_TYPES["bottleneck"] = BottleneckConfig


def _check_virtual_tokens(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_virtual_tokens must be an integer >= 1, got {n!r}")
    return n


def _check_optional_size(name: str, n):
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"{name} must be None or an integer >= 1, got {n!r}")
    return n


@dataclass
class PrefixConfig:
    """Prefix tuning: every attention layer attends first to num_virtual_tokens learned keys and values
    (always visible; causality applies to the sequence). prefix_projection=True learns them through PEFT's
    MLP reparameterisation (hidden encoder_hidden_size, default the model's hidden size);
    fastadapters.fold_prefix(model) replaces it by the plain tensors after training.
    """

    num_virtual_tokens: int = 10
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None
    adapter_type: str = field(default="prefix", init=False)

    def __post_init__(self):
        _check_virtual_tokens(self.num_virtual_tokens)
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection must be True or False, got {self.prefix_projection!r}")
        _check_optional_size("encoder_hidden_size", self.encoder_hidden_size)


@dataclass
class PromptTuningConfig:
    """Prompt tuning: num_virtual_tokens learned embeddings prepended to the input (labels -100 there).

    init="random" draws them from N(0, 1); init="text" copies the word embeddings of init_text, repeated
    or cut to num_virtual_tokens. Text init needs the token ids: pass `tokenizer=` here (it is used once,
    not stored) or init_token_ids directly; the ids are saved with the config.
    """

    num_virtual_tokens: int
    init: str = "random"
    init_text: str | None = None
    init_token_ids: list[int] | None = None
    tokenizer: dataclasses.InitVar[object] = None
    adapter_type: str = field(default="prompt_tuning", init=False)

    def __post_init__(self, tokenizer):
        _check_virtual_tokens(self.num_virtual_tokens)
        if self.init not in ("random", "text"):
            raise ValueError(f"init must be 'random' or 'text', got {self.init!r}")
        if self.init == "random":
            return
        if self.init_token_ids is None:
            if not isinstance(self.init_text, str) or not self.init_text:
                raise ValueError(f"init='text' needs a non-empty init_text, got {self.init_text!r}")
            if tokenizer is None:
                raise ValueError(
                    "init='text' needs tokenizer=... (to turn init_text into ids), or init_token_ids"
                )
            self.init_token_ids = list(tokenizer(self.init_text, add_special_tokens=False)["input_ids"])
        ids = self.init_token_ids
        if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ValueError(f"init_token_ids must be a non-empty list of token ids, got {ids!r}")
        self.init_token_ids = list(ids)


@dataclass
class PTuningConfig:
    """P-tuning: num_virtual_tokens embeddings passed through an encoder ("mlp": 3 linear layers with ReLU;
    "lstm": a 2-layer bidirectional LSTM then a 2-layer MLP, as PEFT's PromptEncoder) and prepended to the
    input (labels -100 there). encoder_hidden_size defaults to the model's hidden size.
    """

    num_virtual_tokens: int
    encoder: str = "mlp"
    encoder_hidden_size: int | None = None
    adapter_type: str = field(default="p_tuning", init=False)

    def __post_init__(self):
        _check_virtual_tokens(self.num_virtual_tokens)
        if self.encoder not in ("mlp", "lstm"):
            raise ValueError(f"encoder must be 'mlp' or 'lstm', got {self.encoder!r}")
        _check_optional_size("encoder_hidden_size", self.encoder_hidden_size)


CONFIG_TYPES.update(prefix=PrefixConfig, prompt_tuning=PromptTuningConfig, p_tuning=PTuningConfig)


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
