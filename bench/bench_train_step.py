"""End-to-end LoRA training step on a tiny random Llama: peft vs fastadapters (vs peft+accelerate).

One step = zero_grad, forward with labels, backward, AdamW step on the adapter parameters.
Setup (issues 6 and 9): h512, 4 layers, batch 4, sequence 256, LoRA r16 (alpha 32) on
q,k,v,up,down, dropout 0.05; fp32 on the CPU, bf16 base weights on a GPU.
Providers: "peft" (get_peft_model), "fastadapters" (fastadapters.apply with the same config),
"peft+accelerate" (fastadapters.accelerate on the PeftModel) and "frozen": the same model with no
adapter at all, every weight frozen, backward from the loss to the input embeddings (so every layer's
input gradient is computed as in LoRA training). "frozen" is the ceiling: a LoRA implementation whose
adapters cost nothing would take its time; t/t(frozen) is the adapters' whole overhead.
DoRA rows (shape name ending " DoRA"): the same setup with use_dora=True and no dropout (with dropout PEFT's
DoRA recomputes the base product on the dropped input, and accelerate leaves it on PEFT's path), "peft" vs
"peft+accelerate" (ops.dora_linear). No QLoRA rows: bitsandbytes is not installed here.
extra_info: tokens per step, saved_bytes (saved for backward, parameters excluded) and flops, the
step's approximate model FLOPs (frozen matmuls forward and input-gradient: 4 per weight per token;
adapter weights: 6; attention scores and values counted in full, not halved for causality).
"""

import pytest
import torch
import transformers

from bench.common import device, on_gpu, pick, record, saved_bytes, synchronize

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
RANK, ALPHA, DROPOUT = 16, 32, 0.05

TINY = dict(hidden=512, intermediate=1376, layers=4, heads=8, kv_heads=8, vocab=2048, batch=4, seq=256)
SMOKE = dict(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=97, batch=2, seq=16)
# On a GPU, also a 4096-wide Llama block pair (7B-sized layers) to see the kernels at realistic widths.
WIDE = dict(hidden=4096, intermediate=11008, layers=2, heads=32, kv_heads=32, vocab=2048, batch=4, seq=512)
SHAPES = pick([TINY], [SMOKE], gpu=[TINY, WIDE])
PROVIDERS = ["peft", "fastadapters", "peft+accelerate", "frozen"]
# A step takes about a second on 2 CPU cores and the machine's speed drifts: more rounds than the default.
pytestmark = pytest.mark.benchmark(min_rounds=12)


DORA_PROVIDERS = ("peft", "peft+accelerate")


def shape_name(s: dict) -> str:
    return f"h{s['hidden']} L{s['layers']} B{s['batch']} T{s['seq']} r{RANK}" + (
        " DoRA" if s.get("dora") else ""
    )


def build_model(s: dict):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=s["hidden"],
        intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        vocab_size=s["vocab"],
        max_position_embeddings=max(512, s["seq"]),
    )
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    return transformers.LlamaForCausalLM(cfg).to(device=device(), dtype=dtype)


def step_flops(model, s: dict) -> int:
    """Approximate FLOPs of one training step (see the module docstring)."""
    frozen = sum(
        p.numel()
        for n, p in model.named_parameters()
        if not p.requires_grad and p.dim() == 2 and "embed" not in n
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tokens = s["batch"] * s["seq"]
    attention = 12 * s["batch"] * s["seq"] ** 2 * s["hidden"] * s["layers"]  # QKᵀ and PV, forward + backward
    return tokens * (4 * frozen + 6 * trainable) + attention


def adapted_model(provider: str, s: dict):
    model = build_model(s)
    if provider == "frozen":
        model.requires_grad_(False)
    elif provider == "fastadapters":
        import fastadapters

        cfg = fastadapters.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=DROPOUT, target_modules=TARGETS)
        fastadapters.apply(model, cfg)
    else:
        import peft

        dora = bool(s.get("dora"))
        cfg = peft.LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=0.0 if dora else DROPOUT,
            target_modules=TARGETS,
            use_dora=dora,
        )
        model = peft.get_peft_model(model, cfg)
        if provider == "peft+accelerate":
            import fastadapters

            model = fastadapters.accelerate(model, verbose=False)
    return model.train()


def make_step(provider: str, s: dict):
    """(model, params, forward, step) for one provider: forward() returns the loss, step() runs a
    whole training step (zero_grad, forward, backward, AdamW step) and returns the loss."""
    model = adapted_model(provider, s)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=gen).to(device())
    embed = model.get_input_embeddings()

    def forward():
        if provider == "frozen":  # gradients flow from the loss down to the embeddings' output
            return model(inputs_embeds=embed(ids).requires_grad_(), labels=ids).loss
        return model(input_ids=ids, labels=ids).loss

    def step():
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        loss = forward()
        loss.backward()
        if opt is not None:
            opt.step()
        return loss

    return model, params, forward, step


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("s", SHAPES + [{**SHAPES[0], "dora": True}], ids=shape_name)
def test_train_step(benchmark, s, provider):
    if s.get("dora") and provider not in DORA_PROVIDERS:
        pytest.skip("DoRA rows compare PEFT with PEFT accelerated")
    model, params, forward, step = make_step(provider, s)
    first = step()  # creates the optimizer state outside the timed rounds
    synchronize()
    saved = saved_bytes(forward, exclude=list(model.parameters()))
    record(
        benchmark,
        op="train_step",
        provider=provider,
        shape=shape_name(s),
        tokens=s["batch"] * s["seq"],
        saved_bytes=saved,
        trainable_params=sum(p.numel() for p in params),
        flops=step_flops(model, s),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
    )
    loss = benchmark(step)
    assert torch.isfinite(first) and torch.isfinite(loss)
    per_target = 3 if s.get("dora") else 2  # A, B (and DoRA's magnitude)
    expected = 0 if provider == "frozen" else per_target * len(TARGETS) * s["layers"]
    assert len(params) == expected, "the adapter must cover every target of every layer"
