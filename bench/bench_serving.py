"""Multi-adapter serving, model level: one batch mixing 16 LoRA adapters over one base model.

CPU setup (issue 5): a tiny Llama (hidden 256, intermediate 688, 4 layers, 4 heads, vocabulary 2048),
16 LoRA adapters of rank 16 on every linear layer (q, k, v, o, gate, up, down), the batch's rows spread
uniformly over the adapters (2 rows each); fp32.
- prefill: one forward of 32 rows × 64 tokens (logits), tokens/s = 2048 / time;
- decode: generate() of 16 new tokens (greedy, KV cache) for 32 rows with 8-token prompts; tokens/s =
  32 × 16 / time (the prefill of the short prompts is included; the ratio to "base" is the decode-step
  overhead).
GPU setup: a Llama with hidden 2048, 4 layers, intermediate 5504, vocabulary 32000, bf16, the same 16
adapters layout; prefill 32 × 128, decode 64 rows.
Providers: "base" (the model, no adapter), "peft" (PeftModel with the 16 adapters, adapter_names= per row:
its mixed batch), "peft-single" (PeftModel with one active adapter for every row: PEFT's best case) and
"fastadapters-<backend>" (AdapterBank, mixed batch, the multi-LoRA op forced to that backend).
"""

import copy

import pytest
import torch
import transformers

from bench.common import device, fastadapters_providers, forced, on_gpu, pick, record
from fastadapters import LoraConfig
from fastadapters.bank import AdapterBank
from fastadapters.ops.multi_lora import BACKENDS

# (hidden, intermediate, layers, heads, vocab, adapters, rank, prefill rows, prefill tokens, decode rows)
SETUP = pick(
    (256, 688, 4, 4, 2048, 16, 16, 32, 64, 32),
    (32, 48, 2, 2, 97, 4, 4, 4, 6, 4),
    gpu=(2048, 5504, 4, 16, 32000, 16, 16, 32, 128, 64),
)
PROMPT, NEW_TOKENS = pick((8, 16), (3, 2), gpu=(8, 16))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPE = torch.bfloat16 if on_gpu() else torch.float32
PROVIDERS = ["base", "peft", "peft-single", *fastadapters_providers(BACKENDS, dtype=DTYPE)]
_CACHE: dict = {}


def setup_name(kind: str) -> str:
    hidden, _, layers, _, _, n, r, rows, seq, dec_rows = SETUP
    dt = str(DTYPE).removeprefix("torch.")
    if kind == "prefill":
        return f"prefill llama h{hidden} L{layers} B{rows} S{seq} {n}x r{r} {dt}"
    return f"decode llama h{hidden} L{layers} B{dec_rows} P{PROMPT}+{NEW_TOKENS} {n}x r{r} {dt}"


def base_and_adapters():
    """The base model and 16 adapters' state dicts (random, non-zero), built once per process."""
    if "base" not in _CACHE:
        hidden, inter, layers, heads, vocab, n, r, *_ = SETUP
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=512, pad_token_id=0,
        )  # fmt: skip
        base = transformers.AutoModelForCausalLM.from_config(cfg).to(device(), DTYPE).eval()
        states = lora_states(base, n, r)
        _CACHE["base"], _CACHE["states"] = base, states
    return _CACHE["base"], _CACHE["states"]


def lora_states(base, n: int, r: int, seed: int = 1) -> list[dict]:
    """n random (non-zero) LoRA state dicts of rank r on every TARGETS layer of `base`."""
    gen = torch.Generator().manual_seed(seed)
    states = []
    for _ in range(n):
        state = {}
        for name, module in base.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                d_out, d_in = module.weight.shape
                state[f"{name}.lora_A.weight"] = torch.randn(r, d_in, generator=gen) / d_in**0.5
                state[f"{name}.lora_B.weight"] = torch.randn(d_out, r, generator=gen) * 0.02
        states.append(state)
    return states


def peft_model(base, states: list[dict], r: int):
    """A PeftModel over a copy of `base` with the adapters a0, a1, ... holding `states`."""
    import peft

    model = None
    for a, state in enumerate(states):
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS, lora_dropout=0.0)
        if model is None:
            model = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
        else:
            model.add_adapter(f"a{a}", cfg)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                which = "lora_A" if ".lora_A." in k else "lora_B"
                path = k.split(f".{which}.")[0]
                params[f"base_model.model.{path}.{which}.a{a}.weight"].copy_(v)
    return model.to(device(), DTYPE).eval()


def bank_of(base, states: list[dict], r: int) -> AdapterBank:
    """An AdapterBank over a copy of `base` with the adapters a0, a1, ... holding `states`."""
    bank = AdapterBank(copy.deepcopy(base))
    for a, state in enumerate(states):
        bank.add(f"a{a}", state, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    return bank


def make_model(provider: str):
    """(model or bank, adapter names per row index) for `provider`."""
    base, states = base_and_adapters()
    r = SETUP[6]
    if provider == "base":
        return base
    if provider.startswith("peft"):
        if "peft" not in _CACHE:
            _CACHE["peft"] = peft_model(base, states, r)
        return _CACHE["peft"]
    if "bank" not in _CACHE:
        _CACHE["bank"] = bank_of(base, states, r)
    return _CACHE["bank"]


def row_names(rows: int) -> list[str]:
    n = SETUP[5]
    return [f"a{i * n // rows}" for i in range(rows)]


def runner(provider: str, kind: str):
    model = make_model(provider)
    _, _, _, _, vocab, _, _, rows, seq, dec_rows = SETUP
    gen = torch.Generator().manual_seed(2)
    if kind == "prefill":
        ids = torch.randint(3, vocab, (rows, seq), generator=gen).to(device())
    else:
        ids = torch.randint(3, vocab, (dec_rows, PROMPT), generator=gen).to(device())
    names = row_names(ids.shape[0])
    gen_kwargs = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    if provider == "base":
        if kind == "prefill":
            return lambda: model(ids, use_cache=False).logits
        return lambda: model.generate(ids, **gen_kwargs)
    if provider == "peft-single":
        model.set_adapter("a0")
        if kind == "prefill":
            return lambda: model(input_ids=ids, use_cache=False).logits
        return lambda: model.generate(input_ids=ids, **gen_kwargs)
    if provider == "peft":
        if kind == "prefill":
            return lambda: model(input_ids=ids, adapter_names=names, use_cache=False).logits
        return lambda: model.generate(input_ids=ids, adapter_names=names, **gen_kwargs)
    if kind == "prefill":
        return lambda: model.forward(ids, adapter_names=names)
    return lambda: model.generate(ids, adapter_names=names, **gen_kwargs)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_serving(benchmark, kind, provider):
    _, _, _, _, _, n, r, rows, seq, dec_rows = SETUP
    with forced(provider), torch.no_grad():
        call = runner(provider, kind)
        out = call()  # warm-up
        tokens = rows * seq if kind == "prefill" else dec_rows * NEW_TOKENS
        record(
            benchmark,
            op="serving",
            provider=provider,
            shape=setup_name(kind),
            tokens=tokens,
            adapters=n,
            rank=r,
            dtype=str(DTYPE).removeprefix("torch."),
        )
        out = benchmark(call)
    if kind == "prefill":
        assert out.shape[:2] == (rows, seq) and torch.isfinite(out.float()).all()
    else:
        assert out.shape == (dec_rows, PROMPT + NEW_TOKENS)
