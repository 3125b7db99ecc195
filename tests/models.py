"""Tiny random HF models of every supported family, built from configs (no downloads)."""

import torch
import transformers as T

FAMILIES = ("llama", "mistral", "qwen2", "bloom", "gptj", "gpt2", "opt", "gpt_neox")
VOCAB = 97


# Per family: the config class and its sizes (hidden 64, 2 layers, 4 heads, MLP 96, 128 positions), in the
# family's own field names.
_SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
_LLAMA_LIKE = dict(_SIZES, intermediate_size=96, num_key_value_heads=2)
_TINY = {
    "llama": (T.LlamaConfig, _LLAMA_LIKE),
    "mistral": (T.MistralConfig, _LLAMA_LIKE),
    "qwen2": (T.Qwen2Config, _LLAMA_LIKE),
    "bloom": (T.BloomConfig, dict(hidden_size=64, n_layer=2, n_head=4)),
    "gptj": (T.GPTJConfig, dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128)),
    "gpt2": (T.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=128)),
    "opt": (T.OPTConfig, dict(_SIZES, ffn_dim=96, word_embed_proj_dim=64)),
    "gpt_neox": (T.GPTNeoXConfig, dict(_SIZES, intermediate_size=96)),
}


def tiny_config(family: str, **overrides):
    if family not in _TINY:
        raise ValueError(family)
    cls, sizes = _TINY[family]
    cfg = cls(vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0, **sizes)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def llama_7b_on_meta():
    """LLaMA-7B's architecture on the meta device (no memory): for the paper's trainable-parameter counts."""
    cfg = T.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        model = T.AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    return model


def tiny_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A randomly initialised causal LM of `family`, in eval mode."""
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


class CountingTokens(torch.utils.data.Dataset):
    """A learnable token dataset: each row counts up from a random start (input_ids = labels)."""

    def __init__(self, n=32, seq=16):
        gen = torch.Generator().manual_seed(0)
        start = torch.randint(3, VOCAB - seq, (n, 1), generator=gen)
        self.ids = start + torch.arange(seq)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_loss_before_after(model, tmp_path, learning_rate: float) -> tuple[float, float]:
    """The model's eval loss on CountingTokens before and after 12 HF Trainer steps (CPU, batch 8)."""
    from transformers import Trainer, TrainingArguments

    data = CountingTokens()
    batch = torch.stack([data[i]["input_ids"] for i in range(len(data))])

    def loss_now():
        model.eval()
        with torch.no_grad():
            return model(batch, labels=batch).loss.item()

    before = loss_now()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=learning_rate,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=4,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=data).train()
    return before, loss_now()


def pipeline_base(directory, items, hidden: int = 32) -> str:
    """A tiny Llama base model folder (2 layers, 320-token vocabulary) whose tokenizer covers `items`'
    prompts, for the train/evaluate pipeline tests; returns its path."""
    from fastadapters.demo import save_base_model
    from fastadapters.prompts import generate_prompt

    texts = [generate_prompt(x["instruction"], x["input"], x["output"]) for x in items]
    return save_base_model(str(directory), texts, hidden=hidden, layers=2, vocab_size=320)
