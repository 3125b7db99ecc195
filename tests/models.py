"""Tiny random HF models of every supported family, built from configs (no downloads)."""

import torch
import transformers as T

FAMILIES = ("llama", "mistral", "qwen2", "bloom", "gptj", "gpt2", "opt", "gpt_neox")
VOCAB = 97


def tiny_config(family: str, **overrides):
    common = dict(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config}[family]
        cfg = cls(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    elif family == "bloom":
        cfg = T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)
    elif family == "gptj":
        cfg = T.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128, **common)
    elif family == "gpt2":
        cfg = T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
    elif family == "opt":
        cfg = T.OPTConfig(
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=128,
            **common,
        )
    elif family == "gpt_neox":
        cfg = T.GPTNeoXConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            **common,
        )
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised causal LM of `family`, in eval mode."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()
