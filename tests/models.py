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
