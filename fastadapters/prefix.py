"""Prefix tuning, prompt tuning and P-tuning: their modules, and how they enter a transformers model.

Prefix tuning (PrefixConfig). Every attention layer owns learned keys and values [Hkv, P, D] (its
`fastadapters_prefix`), which `fastadapters.ops.prefix_attention` attends to before the sequence, always
visible, without copying them per row. Models whose attention goes through transformers' attention
registry (found by fastadapters.structure's traced forward; with each layer's key/value heads and head
size, and refused when it uses logit soft-capping or attention sinks) get a registered attention function and
mask function under the name "fastadapters_prefix"; the KV cache holds real tokens only, so
`generate` (greedy, sampling, beam search, left padding) needs nothing special. The prefix is
position-free: real tokens keep positions 0..S-1 (PEFT instead shifts them by P), and prefix keys are
not rotated. BLOOM computes ALiBi attention outside the registry, so its attention modules get a
patched forward that passes ALiBi and the mask as one dense additive [B, H, S, S_kv] bias (prefix
keys get no ALiBi bias): correct, but slower than the registry path, which reads a [B, S_kv] padding
mask. Under a sliding window (Mistral) the prefix stays visible to every query.

Prompt tuning (PromptTuningConfig) and P-tuning (PTuningConfig) prepend P virtual token embeddings to
the input: a forward pre-hook on the model prepends them (prefill only; decode steps extend the mask
and positions), puts -100 in the labels there and extends the attention mask; a forward hook drops the
P virtual positions from the returned logits, so logits line up with input_ids.
"""

import copy
import math
import types

import torch
import torch.nn.functional as F
from torch import nn

from fastadapters import ops
from fastadapters.config import PrefixConfig, PromptTuningConfig, PTuningConfig
from fastadapters.families import PREFIX_ATTENTION, attention_paths, kv_shape
from fastadapters.layers import AdapterModule

ATTENTION_NAME = "fastadapters_prefix"
PREFIX_ATTR = "fastadapters_prefix"
ENCODER_ATTR = "fastadapters_prefix_encoder"
PROMPT_ATTR = "fastadapters_prompt"


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """fp32 next to an fp16/bf16 base (as LoRA's adapters); each call casts to the compute dtype."""
    keep = weight.dtype == torch.float32 or not weight.dtype.is_floating_point
    return weight.dtype if keep else torch.float32


class PrefixKV(AdapterModule):
    """One attention layer's learned prefix: key and value, each [Hkv, P, D] (N(0, 1) init, as PEFT)."""

    def __init__(self, num_kv_heads: int, num_virtual_tokens: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        shape = (num_kv_heads, num_virtual_tokens, head_dim)
        self.key = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.value = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        if self.key.device.type != "meta":
            nn.init.normal_(self.key)
            nn.init.normal_(self.value)

    def key_value(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key.to(dtype), self.value.to(dtype)


class PrefixEncoder(AdapterModule):
    """PEFT's prefix reparameterisation, shared by all layers: embedding [P, hidden] -> Linear(hidden,
    encoder_hidden) -> tanh -> Linear(encoder_hidden, layers * 2 * Hkv * D). Fold it away after training
    with `fold_prefix`."""

    def __init__(
        self,
        num_layers,
        num_kv_heads,
        num_virtual_tokens,
        head_dim,
        hidden,
        encoder_hidden,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_virtual_tokens = num_virtual_tokens
        kw = dict(device=device, dtype=dtype)
        self.embedding = nn.Embedding(num_virtual_tokens, hidden, **kw)
        self.transform = nn.Sequential(
            nn.Linear(hidden, encoder_hidden, **kw),
            nn.Tanh(),
            nn.Linear(encoder_hidden, num_layers * 2 * num_kv_heads * head_dim, **kw),
        )

    def layer_key_value(self, layer: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s (key, value), each [Hkv, P, D]: only its rows of the last Linear are computed."""
        hidden = self.transform[1](self.transform[0](self.embedding.weight))
        last = self.transform[2]
        width = 2 * self.num_kv_heads * self.head_dim
        rows = slice(layer * width, (layer + 1) * width)
        kv = F.linear(hidden, last.weight[rows], last.bias[rows])  # [P, 2 * Hkv * D], PEFT's layout
        kv = kv.view(self.num_virtual_tokens, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0].to(dtype), kv[1].to(dtype)


class _EncodedPrefix:
    """A layer's view of the shared PrefixEncoder (a plain object, so the encoder is registered once)."""

    def __init__(self, encoder: PrefixEncoder, layer: int):
        self.encoder, self.layer = encoder, layer

    def key_value(self, dtype: torch.dtype):
        return self.encoder.layer_key_value(self.layer, dtype)


# ----------------------------------------------------------------------------------------------------
# transformers integration: attention function and mask function for the registry


def prefix_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention function: softmax over [module's prefix; keys], via ops.prefix_attention.

    query [B, Hq, S, D], key/value [B, Hkv, S_kv, D] (cache included); attention_mask is what
    `prefix_attention_mask` built: None, [B, S_kv] key padding (with causal), or a 4-D bool/additive
    mask that already encodes causality. Returns ([B, S, Hq, D], None).
    """
    prefix = getattr(module, PREFIX_ATTR, None)
    if prefix is None:
        raise RuntimeError(
            f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')}) has no prefix, but the "
            f"model uses the {ATTENTION_NAME!r} attention; apply a PrefixConfig with fastadapters.apply"
        )
    for feature in ("softcap", "s_aux", "sinks"):
        if kwargs.get(feature) is not None:
            raise NotImplementedError(
                f"{type(module).__name__} passes {feature}={kwargs[feature]!r} to its attention function, "
                "which prefix tuning does not support (logit soft-capping, attention sinks)"
            )
    if dropout and module.training:
        raise NotImplementedError(
            f"attention dropout {dropout} is not supported with prefix tuning; set the model config's "
            "attention dropout to 0"
        )
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    if attention_mask is not None and attention_mask.dim() == 4:
        causal = False  # transformers' 4-D masks carry the causal pattern themselves
    dtype = query.dtype
    # Under autocast, rotary embeddings leave q and k in fp32 and v in autocast's dtype: attend in the latter.
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    prefix_k, prefix_v = prefix.key_value(dtype)
    out = ops.prefix_attention(
        query, key, value, prefix_k, prefix_v, attention_mask=attention_mask, causal=causal, scale=scaling
    )
    return out.transpose(1, 2), None


def prefix_attention_mask(
    batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None, **kw
):
    """The registered mask function. A plain causal pattern whose queries end where the keys end (a
    DynamicCache) becomes a [B, kv_length] bool key-padding mask, or None without padding: the op applies
    causality itself, bottom-right aligned. Anything else (sliding window, packed sequences, static caches)
    becomes transformers' 4-D bool mask."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    mask_function = causal_mask_function if mask_function is None else mask_function
    plain = (
        mask_function is causal_mask_function
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset + q_length == kv_offset + kv_length
    )
    if plain:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None:
            return None
        padding = padding[:, kv_offset : kv_offset + kv_length].to(torch.bool)
        return None if bool(padding.all()) else padding
    kw.pop("allow_is_causal_skip", None)
    return sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        **kw,
    )


_REGISTERED: set[str] = set()


def register_attention(name: str = ATTENTION_NAME, forward=None) -> None:
    """Registers `forward` (default: prefix_attention_forward) and the prefix-aware mask function with
    transformers under `name` (idempotent per name)."""
    if name in _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, prefix_attention_forward if forward is None else forward)
    AttentionMaskInterface.register(name, prefix_attention_mask)
    _REGISTERED.add(name)


def _bloom_prefix_forward(
    self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
    output_attentions=False, **kwargs,
):  # fmt: skip
    """BloomAttention.forward with the prefix: ALiBi and the mask go to the op as one additive bias over
    the sequence keys (prefix keys get no ALiBi bias). Slower than the registry path (a dense bias)."""
    from transformers.models.bloom.modeling_bloom import dropout_add

    if self.attention_dropout.p and self.training:
        raise NotImplementedError("BLOOM attention dropout > 0 is not supported with prefix tuning")
    B, S, _ = hidden_states.shape
    query, key, value = self._reshape(self.query_key_value(hidden_states))  # [B, H, S, D] views
    if layer_past is not None:
        key, value = layer_past.update(key, value, self.layer_idx)
    S_kv = key.shape[2]
    bias = alibi.view(B, self.num_heads, 1, S_kv)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            bias = bias.masked_fill(~attention_mask, float("-inf"))
        else:
            bias = bias + attention_mask
    bias = bias.expand(B, self.num_heads, S, S_kv)
    prefix_k, prefix_v = getattr(self, PREFIX_ATTR).key_value(query.dtype)
    out = ops.prefix_attention(
        query, key, value, prefix_k, prefix_v, attention_mask=bias, causal=attention_mask is None,
        scale=self.inv_norm_factor,
    )  # fmt: skip
    context = out.transpose(1, 2).reshape(B, S, self.hidden_size)
    if self.pretraining_tp > 1 and self.slow_but_exact:
        slices = self.hidden_size / self.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(self.pretraining_tp):
            lo, hi = int(i * slices), int((i + 1) * slices)
            output = output + F.linear(context[:, :, lo:hi], self.dense.weight[:, lo:hi])
    else:
        output = self.dense(context)
    return dropout_add(output, residual, self.hidden_dropout, self.training), None


# ----------------------------------------------------------------------------------------------------
# prefix tuning: apply / remove / fold


def build_prefix(model: nn.Module, config: PrefixConfig, paths: list[str], device, dtype) -> dict:
    """The modules prefix tuning adds, keyed by where they go: ENCODER_ATTR (on the model) for
    prefix_projection, else '<attention path>.' + PREFIX_ATTR for each attention layer."""
    shapes = [kv_shape(model, model.get_submodule(path)) for path in paths]
    P = config.num_virtual_tokens
    if config.prefix_projection:
        if len(set(shapes)) > 1:
            raise ValueError(
                "prefix_projection=True needs one key/value shape in every attention layer; this model has "
                f"(key/value heads, head size) {sorted(set(shapes))}: use prefix_projection=False"
            )
        kv_heads, head_dim = shapes[0]
        hidden = model.config.hidden_size
        encoder_hidden = config.encoder_hidden_size or hidden
        return {
            ENCODER_ATTR: PrefixEncoder(
                len(paths), kv_heads, P, head_dim, hidden, encoder_hidden, device, dtype
            )
        }
    return {
        f"{path}.{PREFIX_ATTR}": PrefixKV(kv_heads, P, head_dim, device, dtype)
        for path, (kv_heads, head_dim) in zip(paths, shapes)
    }


def own_config(model: nn.Module) -> None:
    """Gives `model` a copy of its config (and its submodules that hold the same config objects, sub-configs
    included, the copies), so that writing into it (set_attn_implementation) leaves other models built from
    the same config object alone."""
    from transformers import PretrainedConfig

    copies = {}
    copy.deepcopy(model.config, copies)
    for module in model.modules():
        shared = module.__dict__.get("config")
        if isinstance(shared, PretrainedConfig) and id(shared) in copies:
            module.config = copies[id(shared)]


def apply_prefix(model: nn.Module, config: PrefixConfig, families: dict = PREFIX_ATTENTION) -> None:
    """Gives each attention layer its prefix and routes attention through prefix_attention.

    families: the per-family attention table (fastadapters.families.PREFIX_ATTENTION).
    """
    paths, route = attention_paths(model, families)
    if route not in ("registry", "bloom"):
        raise ValueError(f"unknown prefix route {route!r}")
    modules = [model.get_submodule(path) for path in paths]
    weight = next(modules[0].parameters())
    added = build_prefix(model, config, paths, weight.device, _adapter_dtype(weight))
    encoder = added.get(ENCODER_ATTR)
    if encoder is not None:
        setattr(model, ENCODER_ATTR, encoder)
        for i, module in enumerate(modules):
            object.__setattr__(module, PREFIX_ATTR, _EncodedPrefix(encoder, i))
    else:
        for module, path in zip(modules, paths):
            setattr(module, PREFIX_ATTR, added[f"{path}.{PREFIX_ATTR}"])
    if route == "registry":
        register_attention()
        own_config(model)
        previous = model.config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
        if model.config._attn_implementation != ATTENTION_NAME:
            # Some transformers versions only log a warning (GPT-J under 5.17): the prefix would be ignored.
            remove_prefix(model)
            import transformers

            raise NotImplementedError(
                f"prefix tuning of model_type {model.config.model_type!r} needs transformers to route its "
                f"attention through {ATTENTION_NAME!r}, and transformers {transformers.__version__} refused "
                f"to switch it (it stays {previous!r}); use a transformers release in which this model uses "
                "the AttentionInterface (5.24 does for GPT-J)"
            )
        model._fastadapters_previous_attention = previous
    else:
        for module in modules:
            module.forward = types.MethodType(_bloom_prefix_forward, module)


def remove_prefix(model: nn.Module) -> None:
    for module in model.modules():
        if PREFIX_ATTR in module.__dict__ or PREFIX_ATTR in module._modules:
            delattr(module, PREFIX_ATTR)
            patched = module.__dict__.get("forward")
            if getattr(patched, "__func__", None) is _bloom_prefix_forward:
                del module.forward
    if hasattr(model, ENCODER_ATTR):
        delattr(model, ENCODER_ATTR)
    previous = model.__dict__.pop("_fastadapters_previous_attention", None)
    if previous is not None:
        model.set_attn_implementation(previous)


@torch.no_grad()
def fold_prefix(model: nn.Module) -> nn.Module:
    """Replaces a trained prefix_projection MLP by the plain per-layer key/value tensors it produces.

    Afterwards the model computes the same outputs, model.fastadapters_config has prefix_projection=False,
    and save/load store only the [Hkv, P, D] tensors. A model without projection is returned unchanged.
    """
    config = getattr(model, "fastadapters_config", None)
    if not isinstance(config, PrefixConfig):
        raise ValueError(
            f"fold_prefix needs a model with a PrefixConfig adapter, not {type(config).__name__}"
        )
    encoder = getattr(model, ENCODER_ATTR, None)
    if encoder is None:
        return model
    for module in list(model.modules()):
        view = module.__dict__.get(PREFIX_ATTR)
        if isinstance(view, _EncodedPrefix):
            key, value = view.key_value(encoder.embedding.weight.dtype)
            plain = PrefixKV(*key.shape[:2], key.shape[2], key.device, key.dtype)
            plain.key.copy_(key)
            plain.value.copy_(value)
            del module.__dict__[PREFIX_ATTR]
            setattr(module, PREFIX_ATTR, plain)
    delattr(model, ENCODER_ATTR)
    model.fastadapters_config = PrefixConfig(num_virtual_tokens=config.num_virtual_tokens)
    return model


# ----------------------------------------------------------------------------------------------------
# prompt tuning and P-tuning


class PromptEmbedding(AdapterModule):
    """Prompt tuning: P learned virtual token embeddings [P, hidden]."""

    def __init__(self, num_virtual_tokens: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.embedding = nn.Embedding(num_virtual_tokens, hidden, device=device, dtype=dtype)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


class PromptEncoder(AdapterModule):
    """P-tuning (PEFT's PromptEncoder): virtual token embeddings passed through an MLP or a 2-layer
    bidirectional LSTM plus MLP; returns [P, hidden]."""

    def __init__(
        self, num_virtual_tokens: int, hidden: int, encoder: str, encoder_hidden: int, device=None, dtype=None
    ):
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        kw = dict(device=device, dtype=dtype)
        self.embedding = nn.Embedding(num_virtual_tokens, hidden, **kw)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(
                hidden, encoder_hidden, num_layers=2, bidirectional=True, batch_first=True, **kw
            )
            width = 2 * encoder_hidden
            self.mlp_head = nn.Sequential(
                nn.Linear(width, width, **kw), nn.ReLU(), nn.Linear(width, hidden, **kw)
            )
        else:
            self.lstm_head = None
            self.mlp_head = nn.Sequential(
                nn.Linear(hidden, encoder_hidden, **kw),
                nn.ReLU(),
                nn.Linear(encoder_hidden, encoder_hidden, **kw),
                nn.ReLU(),
                nn.Linear(encoder_hidden, hidden, **kw),
            )

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


def _prompt_pre_hook(model, args, kwargs):
    prompt = getattr(model, PROMPT_ATTR)
    if args:
        if len(args) > 1 or "input_ids" in kwargs:
            raise TypeError("with prompt tuning, pass the model's inputs as keywords (input_ids=..., ...)")
        kwargs["input_ids"], args = args[0], ()
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = embeds if embeds is not None else ids
    if ref is None:
        raise ValueError("prompt tuning needs input_ids or inputs_embeds")
    B, S = ref.shape[0], ref.shape[1]
    P = prompt.num_virtual_tokens
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    prefill = cache is None or cache.get_seq_length() == 0
    mask = kwargs.get("attention_mask")
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(f"prompt tuning needs a 2-D attention_mask [B, S], got {tuple(mask.shape)}")
        kwargs["attention_mask"] = torch.cat([mask.new_ones(B, P), mask], dim=1)
    positions = kwargs.get("position_ids")
    if not prefill:  # the cache already holds the virtual tokens; positions continue after them
        if positions is not None:
            kwargs["position_ids"] = positions + P
        prompt._logits_length = None
        return args, kwargs
    if embeds is None:
        embeds = model.get_input_embeddings()(ids)
    virtual = prompt().to(embeds.dtype).unsqueeze(0).expand(B, -1, -1)
    kwargs["inputs_embeds"] = torch.cat([virtual, embeds], dim=1)
    kwargs.pop("input_ids", None)
    labels = kwargs.get("labels")
    if labels is not None:
        kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], P), -100), labels], dim=1)
    if positions is not None:
        first = torch.arange(P, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], P)
        kwargs["position_ids"] = torch.cat([first, positions + P], dim=1)
    prompt._logits_length = P + S
    return args, kwargs


def _prompt_post_hook(model, args, kwargs, output):
    prompt = getattr(model, PROMPT_ATTR)
    length, prompt._logits_length = prompt._logits_length, None
    logits = getattr(output, "logits", None)
    if length is not None and logits is not None and logits.shape[1] == length:
        output.logits = logits[:, prompt.num_virtual_tokens :]
    return output


def _input_embedding_weight(model: nn.Module) -> torch.Tensor:
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{type(model).__name__} has no input embeddings (get_input_embeddings() returning an "
            "nn.Embedding) to prepend virtual tokens to; prompt tuning and P-tuning need one"
        )
    return weight


def build_prompt(config, hidden: int, device, dtype) -> AdapterModule:
    """The module prompt tuning (PromptEmbedding) or P-tuning (PromptEncoder) adds, freshly initialised."""
    P = config.num_virtual_tokens
    if isinstance(config, PromptTuningConfig):
        return PromptEmbedding(P, hidden, device, dtype)
    return PromptEncoder(P, hidden, config.encoder, config.encoder_hidden_size or hidden, device, dtype)


def apply_prompt(model: nn.Module, config) -> None:
    """Adds prompt tuning or P-tuning virtual tokens to the model's input (see the module docstring)."""
    weight = _input_embedding_weight(model)
    P, device, dtype = config.num_virtual_tokens, weight.device, _adapter_dtype(weight)
    prompt = build_prompt(config, weight.shape[1], device, dtype)
    if isinstance(config, PromptTuningConfig) and config.init == "text":
        ids = list(config.init_token_ids)
        if max(ids) >= weight.shape[0] or min(ids) < 0:
            raise ValueError(f"init_token_ids must lie in [0, {weight.shape[0]}) (the vocab), got {ids}")
        ids = (ids * math.ceil(P / len(ids)))[:P]
        with torch.no_grad():
            prompt.embedding.weight.copy_(weight[torch.tensor(ids, device=device)].to(dtype))
    prompt._logits_length = None
    setattr(model, PROMPT_ATTR, prompt)
    prompt._handles = [
        model.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True),
        model.register_forward_hook(_prompt_post_hook, with_kwargs=True),
    ]


def remove_prompt(model: nn.Module) -> None:
    prompt = getattr(model, PROMPT_ATTR, None)
    if prompt is not None:
        for handle in prompt._handles:
            handle.remove()
        delattr(model, PROMPT_ATTR)


ADAPTER_KINDS = {
    PromptTuningConfig: (apply_prompt, remove_prompt),
    PTuningConfig: (apply_prompt, remove_prompt),
}


def state_shapes(model: nn.Module, config) -> dict[str, tuple[int, ...]]:
    """key -> shape of every tensor a prefix, prompt-tuning or P-tuning `config` adds to `model` (the
    modules are built on the meta device; the model is not changed)."""
    if isinstance(config, PrefixConfig):
        paths, _ = attention_paths(model)
        added = build_prefix(model, config, paths, "meta", torch.float32)
    elif isinstance(config, (PromptTuningConfig, PTuningConfig)):
        hidden = _input_embedding_weight(model).shape[1]
        added = {PROMPT_ATTR: build_prompt(config, hidden, "meta", torch.float32)}
    else:
        raise TypeError(f"config must be a PrefixConfig, PromptTuningConfig or PTuningConfig, got {config!r}")
    return {
        f"{where}.{name}": tuple(p.shape)
        for where, module in added.items()
        for name, p in module.adapter_named_parameters()
    }
