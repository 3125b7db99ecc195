"""Every causal LM class of the installed transformers, built tiny from its config, and the checks each
adapter kind must pass on it (shared by tests/test_any_model.py and scripts/model_sweep.py).

The class list is transformers' own MODEL_FOR_CAUSAL_LM_MAPPING_NAMES (model_type -> class), not written
by hand. Each model is built from its config class with the generic tiny sizes below (only the fields the
config has); one that cannot be built, is larger than MAX_PARAMS with these sizes (multimodal models,
fixed sizes), or whose own forward fails, is skipped with the reason.
"""

import copy
import dataclasses
import inspect
import traceback
import warnings

import torch
import transformers as T

import fastadapters
from fastadapters import families
from fastadapters.layers import LoraLinear
from fastadapters.patch import adapter_named_parameters

VOCAB = 97
MAX_PARAMS = 3_000_000
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=96, head_dim=16, max_position_embeddings=128, moe_intermediate_size=32, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    shared_expert_intermediate_size=32, ffn_dim=96, n_positions=128, n_ctx=128, rotary_dim=8, d_model=64,
    decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=96, num_layers=2, n_layer=2, n_head=4,
    n_embd=64, sliding_window=8, bos_token_id=1, eos_token_id=2, pad_token_id=0, linear_num_value_heads=2,
    linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, kv_lora_rank=16, q_lora_rank=32,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, is_decoder=True,
    attn_pdrop=0.0, attention_dropout=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip
KINDS = ("lora", "lora-all-linear", "series", "parallel", "prefix")


def causal_lm_classes() -> dict[str, str]:
    """model_type -> class name of every causal LM in the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def _fields(cls) -> set[str]:
    names = set(getattr(cls, "attribute_map", {}))
    for c in cls.__mro__:
        if dataclasses.is_dataclass(c):
            names |= {f.name for f in dataclasses.fields(c)}
        try:
            names |= set(inspect.signature(c.__init__).parameters)
        except (TypeError, ValueError):
            pass
    return names


def tiny_config(model_type: str, **overrides):
    """The config of `model_type` with the tiny sizes it has fields for."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    fields = _fields(cls)
    return cls(**{k: v for k, v in {**TINY, **overrides}.items() if k in fields})


def ids_batch(seed: int = 0, B: int = 2, S: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, S), generator=gen)


def build(model_type: str, seed: int = 0):
    """(model, None) for a tiny random model of `model_type` in eval mode, or (None, reason to skip)."""
    name = causal_lm_classes()[model_type]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = tiny_config(model_type)
            cls = getattr(T, name)
            with torch.device("meta"):
                size = sum(p.numel() for p in cls(config).parameters())
            if size > MAX_PARAMS:
                return (
                    None,
                    f"not tiny with the generic sizes ({size / 1e6:.0f}M parameters: multimodal or fixed "
                    "sizes)",
                )
            torch.manual_seed(seed)
            model = cls(config).eval()
            with torch.no_grad():
                model(input_ids=ids_batch())
    except Exception as exc:  # noqa: BLE001  (the reason is the report)
        return (
            None,
            f"cannot build tiny or its forward fails: {type(exc).__name__}: {str(exc).splitlines()[0][:140]}",
        )
    return model, None


def config_for(kind: str):
    return {
        "lora": lambda: fastadapters.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0),
        "lora-all-linear": lambda: fastadapters.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"
        ),
        "series": lambda: fastadapters.BottleneckConfig(bottleneck_size=8),
        "parallel": lambda: fastadapters.BottleneckConfig(bottleneck_size=8, use_parallel_adapter=True),
        "prefix": lambda: fastadapters.PrefixConfig(num_virtual_tokens=3),
    }[kind]()


def _randomize(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _generate(model, ids, use_cache=True):
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
            use_cache=use_cache, pad_token_id=0,
        )  # fmt: skip


class _NotComparable(Exception):
    """PEFT cannot put LoRA on the same layers (it refuses them, or changes the model's MoE layout)."""


def _peft_logits(base, ours, config, ids) -> tuple[torch.Tensor, str]:
    """(logits, note) of PEFT's LoRA on the same targets with our A and B. For all-linear, PEFT's own
    resolution; where it differs (PEFT 0.21 wraps MoE experts and routers, and on some MoE models leaves
    out dense MLP layers), our targets, and the note says how it differed."""
    import peft

    layers = {n: m for n, m in ours.named_modules() if isinstance(m, LoraLinear)}
    fan_in_fan_out = any(m.fan_in_fan_out for m in layers.values())
    note = ""

    def wrap(targets):
        cfg = peft.LoraConfig(
            r=config.r, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=targets,
            fan_in_fan_out=fan_in_fan_out,
        )  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
        inner = model.base_model.model
        found = {n for n, m in inner.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
        return model, inner, found

    try:
        theirs, inner, found = wrap(
            "all-linear" if config.target_modules == ["all-linear"] else sorted(layers)
        )
    except ValueError as exc:  # PEFT's own refusals (e.g. Mamba out_proj)
        raise _NotComparable(f"PEFT refuses: {str(exc).splitlines()[0][:160]}") from None
    if found != set(layers) and config.target_modules == ["all-linear"]:
        more, fewer = sorted(found - set(layers)), sorted(set(layers) - found)
        note = f"PEFT's all-linear also wraps {more[:3]}" if more else ""
        note += (", " if more else "") + f"leaves out {fewer[:3]}" if fewer else ""
        note += "; compared on our targets"
        theirs, inner, found = wrap(sorted(layers))
    if found != set(layers):
        raise _NotComparable(
            f"PEFT wraps {sorted(found ^ set(layers))[:3]} differently even when given our targets"
        )
    with torch.no_grad():
        for name, layer in layers.items():
            module = inner.get_submodule(name)
            module.lora_A["default"].weight.copy_(layer.lora_A.weight)
            module.lora_B["default"].weight.copy_(layer.lora_B.weight)
        return theirs(input_ids=ids).logits, note


def check(base, kind: str) -> dict:
    """Runs every check of `kind` on a copy of `base`; returns {"ok": bool, "checks": {...}, "error": str}.

    apply, forward (the adapter changes the logits), backward (every adapter parameter gets a finite
    gradient, some non-zero), generate; LoRA: logits equal PEFT's on the same targets; prefix: greedy
    generation with the KV cache equals generation without it; remove restores the exact base (state dict
    and logits bit for bit).
    """
    result = {"ok": False, "checks": {}, "error": None}
    checks = result["checks"]
    ids = ids_batch()
    try:
        with torch.no_grad():
            base_logits = base(input_ids=ids).logits
        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        model = copy.deepcopy(base)
        config = config_for(kind)
        fastadapters.apply(model, config)
        checks["apply"] = f"{len(list(adapter_named_parameters(model)))} adapter tensors"
        if kind.startswith("lora"):
            _randomize(model)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        assert torch.isfinite(logits).all(), "non-finite logits"
        assert not torch.equal(logits, base_logits), "the adapter does not change the logits"
        checks["forward"] = True
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        # Adapters on layers the forward does not use (cross-attention without an encoder) get no gradient.
        grads = [p.grad for _, p in adapter_named_parameters(model) if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), "no or non-finite gradients"
        assert any(g.abs().sum() > 0 for g in grads), "all gradients zero"
        model.eval()
        model.zero_grad(set_to_none=True)
        checks["backward"] = True
        out = _generate(model, ids)
        assert out.shape[1] > ids.shape[1]
        checks["generate"] = True
        if kind.startswith("lora"):
            try:
                theirs, note = _peft_logits(base, model, config, ids)
                err = (theirs - logits).abs().max().item()
                assert torch.allclose(theirs, logits, atol=1e-4, rtol=1e-4), (
                    f"PEFT logits differ by {err:.2e}"
                )
                checks["equals_peft"] = f"max diff {err:.1e}" + (f" ({note})" if note else "")
            except _NotComparable as exc:
                checks["equals_peft"] = f"not compared ({exc})"
        if kind == "prefix":
            uncached = _generate(model, ids, use_cache=False)
            assert torch.equal(out, uncached), "generation with the KV cache differs from without"
            checks["cache_equals_no_cache"] = True
        fastadapters.remove(model)
        state = model.state_dict()
        assert state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k]) for k in state)
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, base_logits), "logits differ after remove"
        checks["remove_restores"] = True
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001  (the report names it)
        text = str(exc).splitlines()[0] if str(exc) else ""
        result["error"] = f"{type(exc).__name__}: {text[:600]}"
        if not isinstance(exc, (ValueError, NotImplementedError)):
            result["trace"] = traceback.format_exc(limit=-3)[-800:]
    return result


def describe_structure(model) -> dict:
    """What fastadapters read from the model (for the report)."""
    found = families.read_structure(model)
    return {
        "layers": len(found.layers),
        "attention": len(found.attention),
        "mlp": len(found.mlp),
        "interface": sum(b.interface is not None for b in found.attention),
        "groups": sorted({tuple(found.relative(n) for n in g) for g in found.groups}),
        "trace": found.trace,
    }
