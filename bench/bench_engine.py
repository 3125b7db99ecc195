"""The serving engine, closed loop: a trace of requests over N LoRA adapters, 32 requests always in flight.

CPU setup (issue 14): the tiny Llama of bench_serving (hidden 256, 4 layers, vocabulary 2048), fp32, LoRA r16
on every linear layer. A trace of 48 requests: prompts of 8-32 tokens, outputs of 8-16 tokens, each
request's adapter drawn from a Zipf law (s = 1.1) over N adapters, N in {1, 16, 64}. One call serves the
whole trace; output tokens/s = the trace's output tokens / time.
Providers:
- "engine": fastadapters.serving.Engine over an AdapterBank, refilled to 32 requests in flight after each
  step (max_batch_tokens 256);
- "base": the same engine and trace with no adapter (the ceiling);
- "bank": AdapterBank.generate in static batches of 32 requests (left-padded; each batch decodes to its
  longest output);
- "peft": PEFT's `adapter_names` mixed batches of 32 (static, as a simple server collects them);
- "peft-single": PEFT with `set_adapter` per request, one request at a time.
extra_info: tokens (output tokens of the trace), adapters, and for the engine: ttft_p50/p99 and
itl_p50/p99 (ms, from the closed-loop run that the test keeps), sched_share (the share of step time spent
scheduling and packing).
"""

import time

import pytest
import torch
import transformers

from bench.bench_serving import bank_of, lora_states, peft_model
from bench.common import device, on_gpu, pick, record
from fastadapters.serving import Engine

pytestmark = pytest.mark.benchmark(min_rounds=3)

# (hidden, intermediate, layers, heads, vocab, rank, requests, in flight)
SETUP = pick(
    (256, 688, 4, 4, 2048, 16, 48, 32),
    (32, 48, 2, 2, 97, 4, 6, 3),
    gpu=(2048, 5504, 4, 16, 32000, 16, 256, 32),
)
ADAPTERS = pick([1, 16, 64], [2], gpu=[1, 4, 16, 64, 256])
PROMPT, OUTPUT = pick(((8, 32), (8, 16)), ((2, 5), (2, 4)), gpu=((64, 512), (16, 128)))
DTYPE = torch.bfloat16 if on_gpu() else torch.float32
PROVIDERS = ["engine", "base", "bank", "peft", "peft-single"]
_CACHE: dict = {}


def base_model():
    if "base" not in _CACHE:
        hidden, inter, layers, heads, vocab, *_ = SETUP
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=1024, pad_token_id=0,
        )  # fmt: skip
        _CACHE["base"] = transformers.AutoModelForCausalLM.from_config(cfg).to(device(), DTYPE).eval()
    return _CACHE["base"]


def adapter_states(n: int) -> list[dict]:
    if len(_CACHE.get("states", ())) < n:
        _CACHE["states"] = lora_states(base_model(), n, SETUP[5])
    return _CACHE["states"][:n]


def trace(n: int) -> list[tuple[list, str | None, int]]:
    """(prompt ids, adapter name, output tokens) per request; adapters Zipf(1.1) over n."""
    requests, vocab = SETUP[6], SETUP[4]
    gen = torch.Generator().manual_seed(2)
    zipf = 1.0 / torch.arange(1, n + 1, dtype=torch.float64) ** 1.1
    out = []
    for _ in range(requests):
        length = int(torch.randint(PROMPT[0], PROMPT[1] + 1, (1,), generator=gen))
        prompt = torch.randint(3, vocab, (length,), generator=gen).tolist()
        adapter = f"a{int(torch.multinomial(zipf, 1, generator=gen))}"
        out.append((prompt, adapter, int(torch.randint(OUTPUT[0], OUTPUT[1] + 1, (1,), generator=gen))))
    return out


def make_bank(n: int):
    if ("bank", n) not in _CACHE:
        _CACHE[("bank", n)] = bank_of(base_model(), adapter_states(n), SETUP[5])
    return _CACHE[("bank", n)]


def make_peft(n: int):
    if ("peft", n) not in _CACHE:
        _CACHE[("peft", n)] = peft_model(base_model(), adapter_states(n), SETUP[5])
    return _CACHE[("peft", n)]


def serve_engine(engine: Engine, work, base: bool):
    """Closed loop: SETUP's in-flight count at once, refilled after each step; [(start, token times)]."""
    in_flight = SETUP[7]
    queue, running, times = list(work), [], []
    while queue or running:
        while queue and len(running) < in_flight:
            prompt, adapter, new = queue.pop(0)
            handle = engine.add_request(prompt, None if base else adapter, new)
            running.append((handle, time.perf_counter(), []))
        engine.step()
        now = time.perf_counter()
        for handle, _, stamps in running:
            stamps += [now] * (len(handle.output_ids) - len(stamps))
        done = [r for r in running if r[0].finished]
        running = [r for r in running if not r[0].finished]
        times += [(t0, stamps) for _, t0, stamps in done]
    return times


def padded(prompts: list[list]):
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device()), mask.to(device())


def runner(provider: str, n: int):
    work = trace(n)
    in_flight = SETUP[7]
    if provider in ("engine", "base"):
        bank = make_bank(n)

        def call():
            engine = Engine(bank, max_batch_tokens=256, max_seqs=in_flight, kv_budget_bytes=256 << 20)
            _CACHE[("times", provider, n)] = serve_engine(engine, work, provider == "base")
            _CACHE[("stats", provider, n)] = dict(engine.stats)

        return call
    batches = [work[i : i + in_flight] for i in range(0, len(work), in_flight)]
    if provider == "bank":
        bank = make_bank(n)

        def call():
            for b in batches:
                ids, mask = padded([p for p, _, _ in b])
                new = max(k for _, _, k in b)
                bank.generate(ids, mask, adapter_names=[a for _, a, _ in b], max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip

        return call
    model = make_peft(n)
    if provider == "peft":

        def call():
            for b in batches:
                ids, mask = padded([p for p, _, _ in b])
                new = max(k for _, _, k in b)
                names = [a for _, a, _ in b]
                model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=new,
                               min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip

        return call

    def call():
        for prompt, adapter, new in work:
            model.set_adapter(adapter)
            model.generate(input_ids=torch.tensor([prompt], device=device()), max_new_tokens=new,
                           min_new_tokens=new, do_sample=False, pad_token_id=0)  # fmt: skip

    return call


def percentiles(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.quantile(0.5)) * 1e3, float(t.quantile(0.99)) * 1e3


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n", ADAPTERS, ids=lambda n: f"N{n}")
def test_engine(benchmark, n, provider):
    hidden, _, layers, *_ = SETUP
    shape = f"llama h{hidden} L{layers} N{n} zipf {SETUP[7]} in flight"
    with torch.no_grad():
        call = runner(provider, n)
        call()  # warm-up (and the engine's token times, kept below)
        extra = {}
        if provider in ("engine", "base"):
            times = _CACHE[("times", provider, n)]
            stats = _CACHE[("stats", provider, n)]
            extra["ttft_p50_ms"], extra["ttft_p99_ms"] = percentiles([s[0] - t0 for t0, s in times])
            extra["itl_p50_ms"], extra["itl_p99_ms"] = percentiles(
                [b - a for _, s in times for a, b in zip(s, s[1:])] or [0.0]
            )
            extra["sched_share"] = stats["schedule_s"] / max(stats["step_s"], 1e-9)
        record(
            benchmark, op="engine", provider=provider, shape=shape, adapters=n,
            tokens=sum(k for _, _, k in trace(n)), dtype=str(DTYPE).removeprefix("torch."), **extra,
        )  # fmt: skip
        benchmark(call)
