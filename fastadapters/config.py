"""Adapter configs with the LLM-Adapters / PEFT field names. Each serialises to a JSON-safe dict."""

import dataclasses
import math
from dataclasses import dataclass, field

from fastadapters.kernels import ACTIVATIONS as BOTTLENECK_ACTIVATIONS


def check_field(
    name: str, value, kind: str, *, at_least=None, above=None, below=None, choices=(), optional: bool = False
):
    """`value` if it is a `kind` ("bool", "int", "number", "choice") within the bounds, else a ValueError
    naming the field, what was expected and what was given. Bools are only bools, ints are never bools,
    numbers are finite ints or floats; `optional` also accepts None."""
    if optional and value is None:
        return value
    if kind == "bool":
        expected, ok = "True or False", isinstance(value, bool)
    elif kind == "choice":
        expected = "one of " + ", ".join(repr(c) for c in choices)
        ok = isinstance(value, str) and value in choices
    else:
        integer = isinstance(value, int) and not isinstance(value, bool)
        ok = integer if kind == "int" else integer or (isinstance(value, float) and math.isfinite(value))
        expected = "an integer" if kind == "int" else "a finite number"
        if at_least is not None and below is not None:
            expected, ok = f"in [{at_least}, {below})", ok and at_least <= value < below
        elif at_least is not None:
            expected, ok = f"{expected} >= {at_least}", ok and value >= at_least
        elif above is not None:
            expected, ok = f"{expected} > {above}", ok and value > above
    if not ok:
        expected = f"None or {expected}" if optional else expected
        raise ValueError(f"{name} must be {expected}, got {value!r} ({type(value).__name__})")
    return value


def _check_targets(target_modules):
    if target_modules is None:
        return None
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    if isinstance(target_modules, (set, frozenset)):
        target_modules = sorted(target_modules, key=str)
    if (
        not isinstance(target_modules, (list, tuple))
        or not target_modules
        or not all(isinstance(t, str) and t for t in target_modules)
    ):
        raise ValueError(
            "target_modules must be None or a non-empty list of module names (or one comma-separated "
            f"string), got {target_modules!r} ({type(target_modules).__name__})"
        )
    return list(target_modules)


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
        check_field("r (the LoRA rank)", self.r, "int", at_least=1)
        check_field("lora_alpha", self.lora_alpha, "number", above=0)
        check_field("lora_dropout", self.lora_dropout, "number", at_least=0, below=1)
        if self.bias != "none":
            raise ValueError(f"bias must be 'none' (trainable biases are not supported), got {self.bias!r}")
        check_field("use_rslora", self.use_rslora, "bool")
        check_field("init_lora_weights", self.init_lora_weights, "bool")
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
    change the default targets; target_modules=None takes them from the model's structure (the MLP's
    projections for AdapterH, its output projections for AdapterP, the attention input projections for the
    parallel adapter). placements (module name or dotted suffix -> "mh" / "output", or "parallel" for the
    parallel adapter) fixes where each adapter sits; fastadapters.save writes it. scaling is a float
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
    placements: dict[str, str] | None = None
    adapter_type: str = field(default="bottleneck", init=False)

    def __post_init__(self):
        check_field("bottleneck_size", self.bottleneck_size, "int", at_least=1)
        check_field("non_linearity", self.non_linearity, "choice", choices=BOTTLENECK_ACTIVATIONS)
        check_field("adapter_dropout", self.adapter_dropout, "number", at_least=0, below=1)
        s = self.scaling
        if isinstance(s, str):
            if s != "learned":
                raise ValueError(f"scaling must be a finite number or 'learned', got {s!r}")
        elif isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"scaling must be a finite number or 'learned', got {s!r} ({type(s).__name__})")
        else:
            self.scaling = float(s)
        for flag in ("use_parallel_adapter", "use_adapterp"):
            check_field(flag, getattr(self, flag), "bool")
        if self.use_parallel_adapter and self.use_adapterp:
            raise ValueError(
                "use_parallel_adapter and use_adapterp are exclusive: a parallel adapter sits beside each "
                "target, AdapterP is a series adapter after the MLP; set one of them"
            )
        check_field("init_weights", self.init_weights, "choice", choices=("bert", "mam_adapter"))
        self.target_modules = _check_targets(self.target_modules)
        if self.placements is not None:
            allowed = ("parallel",) if self.use_parallel_adapter else ("mh", "output")
            p = self.placements
            if (
                not isinstance(p, dict)
                or not p
                or not all(isinstance(k, str) and k and v in allowed for k, v in p.items())
            ):
                raise ValueError(
                    f"placements must be None or a non-empty dict of module name -> one of {allowed} (for "
                    f"use_parallel_adapter={self.use_parallel_adapter}), got {p!r}"
                )
            self.placements = dict(p)

    @property
    def learned_scaling(self) -> bool:
        return self.scaling == "learned"


CONFIG_TYPES["bottleneck"] = BottleneckConfig


def _check_virtual_tokens(n) -> int:
    return check_field("num_virtual_tokens", n, "int", at_least=1)


def _check_optional_size(name: str, n):
    return check_field(name, n, "int", at_least=1, optional=True)


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
        check_field("prefix_projection", self.prefix_projection, "bool")
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
        check_field("init", self.init, "choice", choices=("random", "text"))
        if self.init_text is not None and not isinstance(self.init_text, str):
            raise ValueError(f"init_text must be None or a string, got {self.init_text!r}")
        if self.init == "random" and self.init_token_ids is None:
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
        if (
            not isinstance(ids, (list, tuple))
            or not ids
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
        ):
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
        check_field("encoder", self.encoder, "choice", choices=("mlp", "lstm"))
        _check_optional_size("encoder_hidden_size", self.encoder_hidden_size)


CONFIG_TYPES.update(prefix=PrefixConfig, prompt_tuning=PromptTuningConfig, p_tuning=PTuningConfig)


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(data: dict):
    """Rebuilds a config saved by `config_to_dict`, every field type-checked; bad data raises ValueError."""
    kind = data.get("adapter_type") if isinstance(data, dict) else data
    if not isinstance(kind, str) or kind not in CONFIG_TYPES:
        raise ValueError(f"adapter_type must be one of {sorted(CONFIG_TYPES)}, got {kind!r}")
    cls = CONFIG_TYPES[kind]
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    unknown = set(data) - names - {"adapter_type"}
    if unknown:
        raise ValueError(f"unknown fields for {cls.__name__}: {sorted(unknown)}")
    required = [
        f.name
        for f in fields
        if f.name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if required:
        raise ValueError(f"{cls.__name__} needs the field(s) {required}, missing")
    return cls(**{k: v for k, v in data.items() if k in names})
