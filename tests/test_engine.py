"""The serving engine: every finished request equals its prompt run alone (fastadapters.load + HF generate,
float64 tiny models so no tie can flip), whatever it was batched with; bad requests get clear errors."""

import copy
import shutil
import threading

import pytest
import torch
from models import VOCAB, tiny_model
from test_bank import OTHERS, lora, make_adapter

import fastadapters
from fastadapters.serving import Engine, PackedBatch, paged_attention, paged_attention_reference
from fastadapters.serving.attention import pad_prefixes
from fastadapters.serving.pool import AdapterPool

NEW = 6
# LoRA of ranks 1 to 64 on different layer sets, series and parallel bottleneck adapters, prefixes.
CONFIGS = {
    "r1": lambda f: lora(1, None, 1),
    "r8": lambda f: lora(8, ["q_proj", "k_proj", "v_proj", "o_proj"], 2),
    "r64": lambda f: lora(64, ["gate_proj", "up_proj", "down_proj", "q_proj", "v_proj"], 3),
    "series": OTHERS["series"],
    "parallel": OTHERS["parallel"],
    "prefix5": OTHERS["prefix5"],
    "prefix3": OTHERS["prefix3"],
}


@pytest.fixture(scope="module", params=["llama", "mistral"])
def setup(request, tmp_path_factory):
    """(base float64 model, {name: folder}, {name: reference model}); mistral with a sliding window of 6."""
    family = request.param
    overrides = {"sliding_window": 6} if family == "mistral" else {}
    base = tiny_model(family, dtype=torch.float64, **overrides)
    root = tmp_path_factory.mktemp(f"engine_{family}")
    folders, refs = {}, {None: base}
    for i, (name, make) in enumerate(CONFIGS.items()):
        folders[name] = str(root / name)
        fastadapters.save(make_adapter(base, make(family), seed=20 + i), folders[name])
        refs[name] = fastadapters.load(copy.deepcopy(base), folders[name]).eval()
    return base, folders, refs


def llama_only(base):
    """Bookkeeping tests run on llama; mistral (sliding window) runs the exactness ones too."""
    if base.config.model_type != "llama":
        pytest.skip("llama covers the same code")


def new_engine(base, folders, **kwargs):
    bank = fastadapters.AdapterBank(copy.deepcopy(base))
    for name, folder in folders.items():
        bank.load(name, folder)
    kwargs.setdefault("num_blocks", 64)
    return Engine(bank, block_size=4, eos_token_id=(), **kwargs)


def alone(refs, prompt, adapter, new=NEW):
    """The request run alone: its adapter's model (fastadapters.load) and HF generate, greedy."""
    out = refs[adapter].generate(
        torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


def prompts(n, seed=0, lo=2, hi=14):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=gen).tolist()
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


def test_mixed_adapters_with_arrivals_mid_decode_equal_alone(setup):
    base, folders, refs = setup
    engine = new_engine(base, folders, max_batch_tokens=12, max_seqs=6)
    names = [None, *CONFIGS]
    handles = []
    for i, prompt in enumerate(prompts(12, seed=1)):
        handles.append(
            (prompt, names[i % len(names)], engine.add_request(prompt, names[i % len(names)], NEW))
        )
        if i % 3 == 2:  # new requests join while the others decode
            engine.step()
            engine.step()
    engine.run_until_done()
    assert engine.stats["steps"] > 0 and engine.cache.free_blocks == engine.cache.num_blocks
    for prompt, adapter, handle in handles:
        assert handle.finish_reason == "length"
        assert handle.output_ids == alone(refs, prompt, adapter), (adapter, prompt)


def test_preemption_recomputes_and_loses_nothing(setup):
    base, folders, refs = setup
    # 10 blocks of 4 positions: six requests of up to 20 positions cannot all hold their caches at once.
    engine = new_engine(base, folders, max_batch_tokens=32, max_seqs=6, num_blocks=10)
    work = [
        (p, name)
        for p, name in zip(
            prompts(6, seed=2, lo=8, hi=14), ["r8", "prefix5", None, "series", "r1", "parallel"]
        )
    ]
    handles = [engine.add_request(p, name, NEW) for p, name in work]
    engine.run_until_done()
    assert engine.stats["preemptions"] > 0
    for (prompt, adapter), handle in zip(work, handles):
        assert handle.output_ids == alone(refs, prompt, adapter)


def test_abort_frees_blocks_and_others_continue(setup):
    base, folders, refs = setup
    llama_only(base)
    engine = new_engine(base, folders, max_batch_tokens=16, max_seqs=4)
    p = prompts(3, seed=3)
    keep = engine.add_request(p[0], "r8", NEW)
    gone = engine.add_request(p[1], "prefix3", NEW)
    waiting = engine.add_request(p[2], None, NEW)
    engine.step()
    engine.abort(gone)
    engine.run_until_done()
    assert gone.finish_reason == "abort" and len(gone.output_ids) < NEW
    assert keep.output_ids == alone(refs, p[0], "r8") and waiting.output_ids == alone(refs, p[2], None)
    assert engine.cache.free_blocks == engine.cache.num_blocks


def test_seeded_sampling_is_the_same_alone_and_in_any_batch(setup):
    base, folders, _ = setup
    llama_only(base)
    prompt = prompts(1, seed=4)[0]
    kwargs = dict(max_new_tokens=8, temperature=1.5, top_k=20, top_p=0.9, seed=123)
    solo = new_engine(base, folders)
    one = solo.add_request(prompt, "r64", **kwargs)
    solo.run_until_done()
    crowd = new_engine(base, folders, max_batch_tokens=10)
    others = [crowd.add_request(q, name, 5, temperature=1.0, seed=i) for i, (q, name) in
              enumerate(zip(prompts(4, seed=5), ["series", None, "r64", "prefix5"]))]  # fmt: skip
    crowd.step()
    two = crowd.add_request(prompt, "r64", **kwargs)
    crowd.run_until_done()
    assert one.output_ids == two.output_ids and len(one.output_ids) == 8
    assert all(h.finished for h in others)
    other_seed = new_engine(base, folders)
    three = other_seed.add_request(prompt, "r64", **{**kwargs, "seed": 7, "top_k": 0, "top_p": 1.0})
    other_seed.run_until_done()
    assert three.output_ids != one.output_ids


def test_streaming_and_adapter_changes_from_other_threads(setup):
    base, folders, refs = setup
    llama_only(base)
    engine = new_engine(base, {k: folders[k] for k in ("r8", "series")}, max_batch_tokens=8)
    p = prompts(3, seed=6)
    streamed = []
    h = engine.add_request(p[0], "r8", NEW)
    reader = threading.Thread(target=lambda: streamed.extend(h))
    reader.start()
    doomed = engine.add_request(p[1], "series", 40)
    engine.step()
    loader = threading.Thread(target=lambda: engine.bank.load("prefix3", folders["prefix3"]))
    loader.start()
    loader.join()
    later = engine.add_request(p[2], "prefix3", NEW)
    engine.step()
    engine.bank.remove("series")  # while its request is decoding
    engine.run_until_done()
    reader.join(timeout=30)
    assert streamed == h.output_ids == alone(refs, p[0], "r8")
    assert later.output_ids == alone(refs, p[2], "prefix3")
    assert doomed.finish_reason == "error" and "removed" in str(doomed.error)
    with pytest.raises(KeyError, match="removed"):
        doomed.result(timeout=1)


def test_bad_requests_are_refused_and_the_engine_keeps_serving(setup):
    base, folders, refs = setup
    llama_only(base)
    engine = new_engine(base, {"r8": folders["r8"]}, num_blocks=8)
    good = engine.add_request([5, 6, 7], "r8", 4)
    cases = [
        (dict(prompt_ids=[5], adapter="nope"), ValueError, "unknown adapter 'nope'"),
        (dict(prompt_ids=[5] * 126, max_new_tokens=4), ValueError, "context of 128 positions"),
        (dict(prompt_ids=[5] * 30, max_new_tokens=4), ValueError, "can never fit the KV cache"),
        (dict(prompt_ids=[5], max_new_tokens=0), ValueError, "max_new_tokens must be an int >= 1"),
        (dict(prompt_ids=[], max_new_tokens=2), ValueError, "at least one token"),
        (dict(prompt_ids=[5, VOCAB]), ValueError, "vocabulary"),
        (dict(prompt_ids=["a"]), TypeError, "token ids"),
        (dict(prompt_ids=[5], temperature=-1.0), ValueError, "temperature"),
        (dict(prompt_ids=[5], top_p=0.0), ValueError, "top_p"),
        (dict(prompt_ids=[5], seed=1.5), ValueError, "seed"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            engine.add_request(**kwargs)
    engine.run_until_done()
    assert good.output_ids == alone(refs, [5, 6, 7], "r8", new=4)
    with pytest.raises(ValueError, match="holds no block"):
        Engine(copy.deepcopy(base), kv_budget_bytes=10)
    with pytest.raises(ValueError, match="max_seqs"):
        Engine(copy.deepcopy(base), num_blocks=4, max_seqs=8, max_batch_tokens=4)


def test_max_active_adapters_holds_requests_until_a_slot_frees(setup):
    base, folders, refs = setup
    llama_only(base)
    engine = new_engine(base, folders, max_active_adapters=1, max_seqs=4)
    p = prompts(3, seed=7)
    a, b, c = (engine.add_request(q, name, 3) for q, name in zip(p, ["r1", "r8", "r1"]))
    engine.step()
    assert len(a.output_ids) == 1 and not b.output_ids  # b waits: r1 holds the one adapter slot
    engine.run_until_done()
    for q, name, h in zip(p, ["r1", "r8", "r1"], (a, b, c)):
        assert h.output_ids == alone(refs, q, name, new=3)


def test_paged_attention_equals_reference():
    """GQA, prefixes of different lengths (and none), sliding window, chunks that start mid-sequence."""
    gen = torch.Generator().manual_seed(0)
    H, Hkv, D, bs = 4, 2, 8, 4
    context, new = [0, 5, 3], [4, 1, 6]
    prefixes = [None, (torch.randn(3, Hkv, D, generator=gen), torch.randn(3, Hkv, D, generator=gen)),
                (torch.randn(1, Hkv, D, generator=gen), torch.randn(1, Hkv, D, generator=gen))]  # fmt: skip
    slots_total = 64
    k_cache, v_cache = (
        torch.randn(slots_total, Hkv, D, generator=gen),
        torch.randn(slots_total, Hkv, D, generator=gen),
    )
    perm = torch.randperm(slots_total // bs, generator=gen)  # scattered blocks
    read, keys, values, q_starts = [], [], [], [0]
    for s, (c, n) in enumerate(zip(context, new)):
        pos = torch.arange(c + n)
        slots = perm[s * 3 + pos // bs] * bs + pos % bs
        read.append(slots)
        keys.append(k_cache[slots])
        values.append(v_cache[slots])
        q_starts.append(q_starts[-1] + n)
    T = q_starts[-1]
    zeros = torch.zeros(T, dtype=torch.long)
    batch = PackedBatch(zeros, zeros, zeros, q_starts, context, [0, 1, 2], zeros, read, zeros[:0], [[]] * 3)
    q = torch.randn(T, H, D, generator=gen)
    for window in (None, 3):
        out = paged_attention(q, k_cache, v_cache, batch, 0.3, pad_prefixes(prefixes, q), window)
        ref = paged_attention_reference(q, keys, values, batch, 0.3, prefixes, window)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- the pool


def pool_engine(base, folders, names, **pool_kwargs):
    pool = AdapterPool(fastadapters.AdapterBank(copy.deepcopy(base)), **pool_kwargs)
    for name in names:
        pool.register(name, folders[name])
    return Engine(pool, block_size=4, eos_token_id=(), num_blocks=64, max_batch_tokens=16), pool


def test_pool_evicts_least_recently_used_keeps_pinned_and_reloads(setup):
    base, folders, refs = setup
    names = ["r1", "r8", "series", "prefix3", "parallel"]
    engine, pool = pool_engine(base, folders, names, max_slots=2)
    pool.pin("r8")
    work = list(zip(prompts(10, seed=8), names * 2))
    handles = [engine.add_request(p, name, 4) for p, name in work]
    pinned_loaded = False
    while engine.has_work():
        engine.step()
        resident = pool.resident()
        assert len(resident) <= 2
        assert "r8@1" in resident or not pinned_loaded  # once loaded, the pinned adapter stays
        pinned_loaded = "r8@1" in resident
    for (prompt, name), handle in zip(work, handles):
        assert handle.output_ids == alone(refs, prompt, name, new=4), name
    assert pool.stats["evictions"] >= 3 and pool.stats["loads"] >= 5 and "r8@1" in pool.resident()


def test_pool_new_version_while_the_old_one_serves(setup):
    base, folders, refs = setup
    llama_only(base)
    engine, pool = pool_engine(base, folders, ["r8"], max_slots=4)
    p = prompts(2, seed=9)
    old = engine.add_request(p[0], "r8", NEW)
    engine.step()
    assert pool.register("r8", folders["series"]) == 2  # the name now serves another adapter
    new = engine.add_request(p[1], "r8", NEW)
    engine.run_until_done()
    assert old.output_ids == alone(refs, p[0], "r8") and new.output_ids == alone(refs, p[1], "series")
    assert pool.resident() == ["r8@2"]  # version 1 left once its last request finished


def test_pool_refuses_bad_adapters_and_the_engine_keeps_serving(setup, tmp_path):
    base, folders, refs = setup
    llama_only(base)
    engine, pool = pool_engine(base, folders, ["r8"], max_slots=2)
    running = engine.add_request([4, 5, 6], "r8", 4)
    engine.step()
    corrupt = tmp_path / "corrupt"
    shutil.copytree(folders["r1"], corrupt)
    (weights,) = corrupt.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])
    other = tiny_model("llama", dtype=torch.float64, hidden_size=32, intermediate_size=48)
    fastadapters.save(make_adapter(other, lora(4, None, 1), seed=1), str(tmp_path / "other"))
    for source, match in (
        (str(corrupt), "safetensors|corrupt|header|incomplete"),
        (str(tmp_path / "other"), "base"),
    ):
        with pytest.raises((ValueError, OSError), match=match):
            pool.register("bad", source)
    assert pool.names() == ["r8"]
    with pytest.raises(ValueError, match="budget_bytes"):
        AdapterPool(copy.deepcopy(base), budget_bytes=16).register("r1", folders["r1"])
    with pytest.raises(ValueError, match="unknown adapter 'bad'"):
        engine.add_request([4], "bad", 2)
    engine.run_until_done()
    assert running.output_ids == alone(refs, [4, 5, 6], "r8", new=4)
