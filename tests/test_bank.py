"""AdapterBank: one batch, one adapter (or none) per row, over one copy of the base model.

Each row of a bank batch equals that row run alone on a model patched with only its adapter
(fastadapters.apply + load, or peft): logits within tolerance and the same greedy tokens. LoRA ranks 1, 8,
16 and 64 on different layers mixed in one batch; adapter spreads distinct, uniform, zipf, identical and
all-base; left padding; beams; tiny Llama, Qwen2 and GPT-2. Loading and removing while another thread
generates; bad input (unknown names, wrong counts, another base model, corrupt files) leaves the bank as
it was.
"""

import copy
import os
import re
import threading

import peft
import pytest
import torch
from conftest import HYPOTHESIS, assert_close
from hypothesis import given, settings
from hypothesis import strategies as st
from models import VOCAB, tiny_config, tiny_model
from test_multi_lora import row_adapters

import fastadapters
from fastadapters import ops
from fastadapters.bank import AdapterBank, BankLinear
from fastadapters.patch import adapter_named_parameters

FAMILIES = ("llama", "qwen2", "gpt2")
LoraConfig, BottleneckConfig, PrefixConfig = (
    fastadapters.LoraConfig,
    fastadapters.BottleneckConfig,
    fastadapters.config.PrefixConfig,
)
_LLAMA_ALL = ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj"]
# Five LoRA adapters (every rank of the issue, on different layer sets; None: the family default) ...
LORAS = {
    "llama": [(1, None), (8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
              (16, ["up_proj", "down_proj", "v_proj"]), (64, _LLAMA_ALL), (8, ["k_proj"])],
    "gpt2": [(1, None), (8, ["c_attn", "c_proj"]), (16, ["c_fc"]), (64, ["c_attn", "c_fc", "c_proj"]),
             (8, None)],
}  # fmt: skip
LORAS["qwen2"] = LORAS["llama"]
# ... then one of each other type: series (AdapterH, AdapterP), parallel (attention and MLP), prefixes of
# two lengths and a prefix_projection one (folded by the bank when it loads it).
OTHERS = {
    "series": lambda f: BottleneckConfig(bottleneck_size=16, non_linearity="relu"),
    "adapterp": lambda f: BottleneckConfig(bottleneck_size=8, use_adapterp=True, non_linearity="gelu",
                                           scaling="learned"),
    "parallel": lambda f: BottleneckConfig(bottleneck_size=12, use_parallel_adapter=True,
                                           non_linearity="silu", scaling=2.0),
    "parallel_mlp": lambda f: BottleneckConfig(
        bottleneck_size=24, use_parallel_adapter=True, non_linearity="sigmoid",
        target_modules=["c_fc", "mlp.c_proj"] if f == "gpt2" else ["up_proj", "down_proj"]),
    "prefix5": lambda f: PrefixConfig(num_virtual_tokens=5),
    "prefix3": lambda f: PrefixConfig(num_virtual_tokens=3),
    "prefix_proj": lambda f: PrefixConfig(num_virtual_tokens=5, prefix_projection=True,
                                          encoder_hidden_size=24),
}  # fmt: skip
SPREADS = ("distinct", "uniform", "zipf", "identical", "all-base")


def make_adapter(base, config, seed):
    """A copy of `base` patched with one adapter with random (non-zero) weights, in eval mode."""
    model = fastadapters.apply(copy.deepcopy(base), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            # A learned scaling (one value) stays near 1; every other tensor is random.
            p.copy_(torch.randn(p.shape, generator=gen) * 0.15 + (1.0 if p.numel() == 1 else 0.0))
    return model.eval()


def lora(rank, targets, seed):
    return LoraConfig(r=rank, lora_alpha=2 * rank + seed, target_modules=targets)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    """(family, base, {name: folder}, {name: reference model}): five LoRA adapters, then one of each type."""
    family = request.param
    base = tiny_model(family)
    root = tmp_path_factory.mktemp(f"bank_{family}")
    configs = {f"r{rank}_{i}": lora(rank, targets, 10 + i) for i, (rank, targets) in enumerate(LORAS[family])}
    configs.update({name: make(family) for name, make in OTHERS.items()})
    folders, refs = {}, {None: base}
    for i, (name, config) in enumerate(configs.items()):
        fastadapters.save(make_adapter(base, config, seed=10 + i), str(root / name))
        folders[name] = str(root / name)
        # The reference: a fresh base patched by fastadapters.load (the saved file, not the object).
        refs[name] = fastadapters.load(copy.deepcopy(base), folders[name]).eval()
    return family, base, folders, refs


def new_bank(base, folders, names=None):
    bank = AdapterBank(copy.deepcopy(base))
    for name in names or folders:
        bank.load(name, folders[name])
    return bank


def padded_batch(lengths, seed=0):
    """Left-padded input_ids and attention_mask for rows of `lengths` tokens (pad id 0)."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(3, VOCAB, (n,), generator=gen)
        mask[i, width - n :] = 1
    return ids, mask


def spread_names(spread, names, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = row_adapters(spread, rows, len(names), gen).tolist()
    return [None if a < 0 else names[a] for a in ids]


# --------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("spread", SPREADS)
def test_rows_equal_single_adapter_models(setup, spread):
    family, base, folders, refs = setup
    if family != "llama" and spread not in ("uniform", "distinct"):
        pytest.skip("every spread runs on llama; the other families take two")
    bank = new_bank(base, folders)
    lengths = [7, 4, 7, 6, 5, 7]
    names = spread_names(spread, bank.names(), len(lengths), seed=len(spread))
    ids, mask = padded_batch(lengths, seed=1)
    logits = bank.forward(ids, mask, adapter_names=names)
    tokens = bank.generate(ids, mask, adapter_names=names, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert logits.shape == (len(lengths), ids.shape[1], VOCAB)
    for i, (name, n) in enumerate(zip(names, lengths)):
        row = ids[i : i + 1, ids.shape[1] - n :]
        with torch.no_grad():
            expected = refs[name](row).logits
            expected_tokens = refs[name].generate(row, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert_close(logits[i : i + 1, ids.shape[1] - n :], expected, name=f"row {i} ({name}) logits")
        # A row that stops at EOS is padded (id 0) while the batch goes on.
        got = tokens[i, ids.shape[1] - n :]
        assert torch.equal(got[: expected_tokens.shape[1]], expected_tokens[0]), f"row {i} ({name}) tokens"
        assert not got[expected_tokens.shape[1] :].any()


def test_every_adapter_type_in_one_batch(setup):
    """LoRA, series (AdapterH, AdapterP), parallel and prefix adapters (two lengths, and a folded
    prefix_projection) and the base model, one row each, left-padded rows of different lengths."""
    family, base, folders, refs = setup
    bank = new_bank(base, folders)
    names = ["series", None, "prefix5", "r64_3", "parallel", "prefix_proj", "adapterp", "prefix3",
             "parallel_mlp", "r1_0"]  # fmt: skip
    lengths = [6, 3, 6, 5, 6, 4, 6, 6, 2, 5]
    ids, mask = padded_batch(lengths, seed=7)
    logits = bank.forward(ids, mask, adapter_names=names)
    tokens = bank.generate(ids, mask, adapter_names=names, max_new_tokens=3, do_sample=False, pad_token_id=0)
    width = ids.shape[1]
    for i, (name, n) in enumerate(zip(names, lengths)):
        row = ids[i : i + 1, width - n :]
        with torch.no_grad():
            expected = refs[name](row).logits
            expected_tokens = refs[name].generate(row, max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert_close(logits[i : i + 1, width - n :], expected, name=f"row {i} ({name}) logits")
        got = tokens[i, width - n :]
        assert torch.equal(got[: expected_tokens.shape[1]], expected_tokens[0]), f"row {i} ({name}) tokens"


def test_adapters_differ_from_base_and_each_other(setup):
    """The exactness test is not vacuous: every adapter changes the logits, and differently."""
    family, base, folders, refs = setup
    bank = new_bank(base, folders)
    names = [None, *bank.names()]
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2)).expand(len(names), 6)
    logits = bank.forward(ids, adapter_names=names)
    for i in range(len(names)):
        for j in range(i):
            assert (logits[i] - logits[j]).abs().max() > 1e-2, (names[i], names[j])


def test_beams_and_return_sequences(setup):
    """generate() repeats rows for beams: each copy keeps its row's adapter."""
    family, base, folders, refs = setup
    bank = new_bank(base, folders)
    names = [bank.names()[3], None, bank.names()[0]]
    ids, mask = padded_batch([5, 5, 5], seed=3)
    kwargs = dict(max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    out = bank.generate(ids, mask, adapter_names=names, **kwargs)
    assert out.shape[0] == 6
    for i, name in enumerate(names):
        with torch.no_grad():
            expected = refs[name].generate(ids[i : i + 1], **kwargs)
        assert torch.equal(out[2 * i : 2 * i + 2], expected), f"row {i} ({name})"


def test_outside_a_request_the_model_is_the_base(setup):
    family, base, folders, refs = setup
    bank = new_bank(base, folders)
    assert any(isinstance(m, BankLinear) for m in bank.model.modules())
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(bank.model(ids).logits, base(ids).logits)
    torch.testing.assert_close(bank.forward(ids, adapter_names=[None, None]), base(ids).logits)


def test_peft_folders_and_peft_mixed_batch():
    """PEFT LoRA folders load into the bank; a bank batch equals PEFT's own adapter_names mixed batch."""
    base = tiny_model("llama")
    targets = ["q_proj", "v_proj", "down_proj"]
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    pm.add_adapter("second", peft.LoraConfig(r=16, lora_alpha=8, target_modules=["k_proj", "up_proj"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.eval()
    bank = AdapterBank(copy.deepcopy(base))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        pm.save_pretrained(tmp)  # default in tmp/, the second in tmp/second/
        bank.load("first", tmp)
        bank.load("second", os.path.join(tmp, "second"))
    ids = torch.randint(3, VOCAB, (4, 6), generator=gen)
    ours = bank.forward(ids, adapter_names=["second", None, "first", "second"])
    with torch.no_grad():
        theirs = pm(ids, adapter_names=["second", "__base__", "default", "second"]).logits
    assert_close(ours, theirs, name="bank vs peft mixed batch")


def test_fp16_bank_matches_fp16_model(setup):
    family, base, folders, refs = setup
    if family != "llama":
        pytest.skip("one family is enough for the dtype check")
    base16 = copy.deepcopy(base).half()
    bank = new_bank(base16, folders)
    names = ["r16_2", None, "r64_3", "series", "prefix5", "parallel"]
    ids = torch.randint(3, VOCAB, (len(names), 5))
    logits = bank.forward(ids, adapter_names=names)
    assert logits.dtype == torch.float16
    for i, name in enumerate(names):
        ref = base16 if name is None else fastadapters.load(copy.deepcopy(base16), folders[name]).eval()
        with torch.no_grad():
            assert_close(logits[i : i + 1], ref(ids[i : i + 1]).logits, name=f"row {i} ({name})")


# --------------------------------------------------------------------------------------------- threads


def test_concurrent_load_remove_while_generating(setup):
    """One thread generates while another loads and removes adapters: no request lost or crossed."""
    family, base, folders, refs = setup
    if family != "llama":
        pytest.skip("one family is enough for the threading test")
    names = list(folders)
    bank = new_bank(base, folders, names=names[:2])
    ids, mask = padded_batch([6, 4], seed=4)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    expected = {}
    for name in (names[0], names[1], None):
        with torch.no_grad():
            expected[name] = [
                refs[name].generate(ids[i : i + 1, 6 - n :], **kwargs)[0] for i, n in enumerate([6, 4])
            ]
    stop, errors, done = threading.Event(), [], []

    def churn():
        try:
            while not stop.is_set():
                for name in names[2:]:
                    bank.load(name, folders[name])
                for name in names[2:]:
                    bank.remove(name)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for step in range(6):
            row_names = [(names[0], names[1]), (None, names[0]), (names[1], None)][step % 3]
            out = bank.generate(ids, mask, adapter_names=list(row_names), **kwargs)
            for i, (name, n) in enumerate(zip(row_names, [6, 4])):
                assert torch.equal(out[i, 6 - n :], expected[name][i]), (step, i, name)
            done.append(step)
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
    assert done == list(range(6))
    assert bank.names() == names[:2]


def test_request_in_flight_keeps_its_weights(setup):
    """remove + add under the same name while a generate is running: the running request is unaffected."""
    family, base, folders, refs = setup
    if family != "llama":
        pytest.skip("one family is enough for the threading test")
    names = list(folders)
    bank = new_bank(base, folders, names=[names[0]])
    ids = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(6))
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    started, swapped, calls = threading.Event(), threading.Event(), []

    def pause_after_prefill(module, args, kwargs_):
        calls.append(1)
        if len(calls) == 2 and threading.current_thread().name == "request":
            started.set()
            assert swapped.wait(30)

    handle = bank.model.register_forward_pre_hook(pause_after_prefill, with_kwargs=True)
    result = {}
    thread = threading.Thread(
        target=lambda: result.update(out=bank.generate(ids, adapter_names=[names[0], None], **kwargs)),
        name="request",
    )
    thread.start()
    try:
        assert started.wait(60)
        bank.remove(names[0])
        bank.load(names[0], folders[names[3]])  # same name, other weights
        swapped.set()
    finally:
        swapped.set()
        thread.join()
        handle.remove()
    with torch.no_grad():
        old = refs[names[0]].generate(ids[:1], **kwargs)
        new = refs[names[3]].generate(ids[:1], **kwargs)
    assert torch.equal(result["out"][:1], old)
    assert not torch.equal(old, new)
    # A new request sees the new weights.
    assert torch.equal(bank.generate(ids[:1], adapter_names=[names[0]], **kwargs), new)


# --------------------------------------------------------------------------------------------- errors


def test_bad_requests(setup):
    family, base, folders, refs = setup
    bank = new_bank(base, folders, names=list(folders)[:2])
    ids = torch.randint(3, VOCAB, (2, 4))
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; loaded adapters"):
        bank.forward(ids, adapter_names=["nope", None])
    with pytest.raises(ValueError, match="3 entries for a batch of 2 rows"):
        bank.forward(ids, adapter_names=[None, None, None])
    with pytest.raises(ValueError, match="1 entries for a batch of 2 rows"):
        bank.generate(ids, adapter_names=[None], max_new_tokens=1)
    with pytest.raises(TypeError, match="one name"):
        bank.forward(ids, adapter_names="r1_0")
    with pytest.raises(ValueError, match="unknown adapter 'nope'"):
        bank.remove("nope")
    with pytest.raises(ValueError, match="already loaded"):
        bank.load(bank.names()[0], folders[bank.names()[0]])


def test_bad_inputs_are_named():
    """Malformed requests raise a TypeError/ValueError naming the argument, before the model runs."""
    bank = AdapterBank(tiny_model("llama"))
    ids = torch.randint(3, VOCAB, (2, 4))
    name_error = r"^adapter_names\[{}\] must be an adapter name \(str\) or None, got {}"
    for call in (bank.forward, lambda *a, **kw: bank.generate(*a, max_new_tokens=1, **kw)):
        with pytest.raises(TypeError, match=name_error.format(0, "list")):
            call(ids, None, [["a"], None])
        with pytest.raises(TypeError, match=name_error.format(1, "int")):
            call(ids, None, [None, 3])
        with pytest.raises(TypeError, match=r"^input_ids must hold integer token ids .* dtype torch.float32"):
            call(ids.float(), None, [None, None])
        for mask in (torch.ones(2, 5), torch.ones(3, 4), torch.ones(2, 4, 1)):
            shape = re.escape(str(tuple(mask.shape)))
            with pytest.raises(
                ValueError, match=rf"^attention_mask must have input_ids' shape .* got shape {shape}"
            ):
                call(ids, mask, [None, None])
        with pytest.raises(TypeError, match=r"^attention_mask must be a torch.Tensor of shape \(2, 4\)"):
            call(ids, [[1] * 4] * 2, [None, None])
    logits = bank.forward(ids, torch.ones(2, 4, dtype=torch.bool), [None, None])  # bool, int, float all fine
    assert torch.equal(logits, bank.forward(ids, torch.ones(2, 4), [None, None]))


def test_bank_leaves_models_sharing_its_config_alone():
    """Two models built from one config object: a bank serving a prefix on one routes only that model's
    attention (set_attn_implementation writes into the config; the bank's model gets a copy first)."""
    cfg = tiny_config("llama")
    served, other = (tiny_model_from(cfg, seed) for seed in (0, 1))
    assert served.config is other.config
    before = other.config._attn_implementation
    ids = torch.randint(3, VOCAB, (1, 5))
    with torch.no_grad():
        expected = other(ids).logits
    bank = AdapterBank(served)
    config = OTHERS["prefix5"]("llama")
    bank.add(
        "p", fastadapters.io.adapter_state_dict(make_adapter(tiny_model("llama"), config, seed=3)), config
    )
    assert served.config._attn_implementation == "fastadapters_bank"
    assert other.config._attn_implementation == before
    with torch.no_grad():
        assert torch.equal(other(ids).logits, expected)
    assert bank.forward(ids, adapter_names=["p"]).isfinite().all()


def tiny_model_from(cfg, seed):
    """LlamaForCausalLM(cfg): the model holds `cfg` itself (from_config would copy it)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def _state_and_outputs(bank, ids):
    return bank.names(), bank.forward(ids, adapter_names=[*bank.names(), None][: ids.shape[0]])


@pytest.mark.parametrize("case", ["other base (fastadapters)", "other base (peft)", "other base (bottleneck)",
                                  "other base (prefix)", "corrupt", "truncated", "missing", "bad keys",
                                  "unsupported config"])  # fmt: skip
def test_bad_adapters_leave_the_bank_unchanged(setup, case, tmp_path):
    family, base, folders, refs = setup
    if family == "qwen2":
        pytest.skip("llama covers the same code")
    bank = new_bank(base, folders, names=list(folders)[:2])
    ids = torch.randint(3, VOCAB, (3, 4))
    names_before, logits_before = _state_and_outputs(bank, ids)
    modules_before = {n for n, m in bank.model.named_modules() if isinstance(m, BankLinear)}
    other = tiny_model(family, n_embd=32) if family == "gpt2" else tiny_model(family, hidden_size=32)
    if case == "other base (fastadapters)":
        fastadapters.save(make_adapter(other, lora(4, None, 1), seed=1), str(tmp_path / "a"))
        err, match = ValueError, "different base model"
    elif case == "other base (peft)":
        model = make_adapter(other, lora(4, None, 1), seed=1)
        fastadapters.save_peft(model, str(tmp_path / "a"))
        err, match = ValueError, "different base model"
    elif case in ("other base (bottleneck)", "other base (prefix)"):
        config = OTHERS["parallel" if "bottleneck" in case else "prefix5"](family)
        if "prefix" in case and family != "gpt2":
            other = tiny_model(family, num_key_value_heads=4)  # (a changed hidden_size keeps head_dim)
        fastadapters.save(make_adapter(other, config, seed=1), str(tmp_path / "a"))
        err, match = ValueError, "different base model"
        # The same adapter handed over in memory (no base-model record to compare): its shapes are refused.
        config, state, _ = fastadapters.io.read_adapter(str(tmp_path / "a"))
        with pytest.raises(ValueError, match="different base model"):
            bank.add("x", state, config)
    elif case in ("corrupt", "truncated"):
        fastadapters.save(make_adapter(base, lora(4, None, 1), seed=1), str(tmp_path / "a"))
        path = tmp_path / "a" / "adapter.safetensors"
        data = path.read_bytes()
        path.write_bytes(
            data[: len(data) // 2] if case == "truncated" else data[:8] + b"{garbage" + data[16:]
        )
        err, match = ValueError, "truncated or corrupted"
    elif case == "missing":
        err, match = FileNotFoundError, "not found"
    elif case == "bad keys":
        with pytest.raises(ValueError, match=r"unexpected \['model\.nope\.lora_A\.weight'"):
            state = {
                "model.nope.lora_A.weight": torch.zeros(4, 64),
                "model.nope.lora_B.weight": torch.zeros(64, 4),
            }
            bank.add("x", state, fastadapters.LoraConfig(r=4))
        key = min(bank._state.adapters[bank.names()[0]].lora)
        with pytest.raises(ValueError, match=rf"missing \['{re.escape(key)}\.lora_B\.weight'"):
            bank.add("x", {f"{key}.lora_A.weight": torch.zeros(1, 64)}, fastadapters.LoraConfig(r=1))
        err = None
    else:
        with pytest.raises(TypeError, match="AdapterBank serves"):
            bank.add("x", {}, object())
        err = None
    if err is not None:
        with pytest.raises(err, match=match):
            bank.load("x", str(tmp_path / "a"))
    names_after, logits_after = _state_and_outputs(bank, ids)
    assert names_after == names_before
    torch.testing.assert_close(logits_after, logits_before, rtol=0, atol=0)
    assert {n for n, m in bank.model.named_modules() if isinstance(m, BankLinear)} == modules_before


def test_one_bank_per_model():
    base = tiny_model("llama")
    bank = AdapterBank(base)
    with pytest.raises(ValueError, match="already served"):
        AdapterBank(base)
    assert bank.names() == []
    patched = fastadapters.apply(tiny_model("llama"), fastadapters.LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has a fastadapters adapter"):
        AdapterBank(patched)


# ----------------------------------------------------------------------------------------- faulty adapters

# Adapters for the NaN-isolation tests (tiny Llama): four LoRA adapters of one rank on the default targets
# (one bucket: with four present, prefill takes the rows-of-one-adapter path, base rows riding along), one
# of another rank on other layers, two series adapters of one size and activation, a parallel one, and
# prefixes of two lengths.
NAN_ADAPTERS = {
    **{f"lora{i}": (lambda i=i: LoraConfig(r=4, lora_alpha=4 + i)) for i in range(4)},
    "lora_r8": lambda: lora(8, ["q_proj", "k_proj", "v_proj", "o_proj"], 3),
    "series": lambda: OTHERS["series"]("llama"),
    "series_b": lambda: OTHERS["series"]("llama"),
    "parallel": lambda: OTHERS["parallel"]("llama"),
    "prefix5": lambda: OTHERS["prefix5"]("llama"),
    "prefix3": lambda: OTHERS["prefix3"]("llama"),
}
# None: the default choice on the CPU (the C++ extension for multi-LoRA, torch for the bottleneck and
# prefix ops, which have no C++ kernel); then each other backend forced.
CPU_BACKENDS = (None, "torch", "triton")


@pytest.fixture(scope="module")
def nan_banks():
    """bank(bad) -> an AdapterBank holding every NAN_ADAPTERS adapter in one order, the adapter `bad`
    (None: none) with every tensor NaN. Banks are built on first use. The NaN state goes in through
    bank.add: the bank, unlike fastadapters.load, does not check finiteness."""
    base = tiny_model("llama")
    states = {}
    for i, (name, make) in enumerate(NAN_ADAPTERS.items()):
        config = make()
        states[name] = (config, fastadapters.io.adapter_state_dict(make_adapter(base, config, seed=40 + i)))
    banks = {}

    def bank(bad):
        if bad not in banks:
            banks[bad] = AdapterBank(copy.deepcopy(base))
            for name, (config, state) in states.items():
                if name == bad:
                    state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
                banks[bad].add(name, state, config)
        return banks[bad]

    return bank


def assert_nan_isolated(nan_banks, names, bad, lengths, backend):
    """Rows of adapters other than `bad` give bit-identical logits with and without `bad` NaN-filled;
    rows of `bad` are NaN (the fill reached the batch)."""
    ids, mask = padded_batch(lengths, seed=len(names))
    with ops.use_backend(backend):
        clean = nan_banks(None).forward(ids, mask, adapter_names=names)
        dirty = nan_banks(bad).forward(ids, mask, adapter_names=names)
    assert not clean.isnan().any()
    for i, name in enumerate(names):
        real = slice(ids.shape[1] - lengths[i], None)  # padded positions are not checked
        if name == bad:
            assert dirty[i, real].isnan().all(), f"row {i} ({name}): the NaN adapter left its own row finite"
        else:
            assert torch.equal(dirty[i, real], clean[i, real]), (
                f"row {i} ({name}) changed when adapter {bad!r} was NaN-filled; rows {names}, "
                f"lengths {lengths}, backend {backend or 'default'}"
            )


@pytest.mark.parametrize("backend", CPU_BACKENDS, ids=lambda b: b or "default")
@pytest.mark.parametrize(
    "names, bad, lengths",
    [
        # The case: a padded few-token batch, the padding reading another adapter's token.
        (["series", "series_b", "series"], "series_b", [3, 2, 3]),
        # Four LoRA adapters of one bucket over rows of >= 8 tokens: the base and bottleneck rows ride in
        # the bucket's batch, borrowing lora0's index.
        (["lora0", "lora1", "lora2", "lora3", None, "series"], "lora0", [9, 8, 9, 9, 7, 9]),
        (["lora1", "lora0", None], "lora0", [5, 5, 4]),
        ([None, "prefix5", "lora0"], "prefix5", [4, 5, 3]),  # rows without a prefix borrow prefix 0
        (["prefix3", "prefix5", None, "prefix3"], "prefix3", [2, 4, 4, 3]),
    ],
)
def test_nan_adapter_changes_no_other_row(nan_banks, names, bad, lengths, backend):
    """A NaN-filled adapter (e.g. a diverged training run) leaves every other row of the batch exactly as
    it was: a row's result depends only on its own adapter, on every backend."""
    assert_nan_isolated(nan_banks, names, bad, lengths, backend)


@pytest.mark.parametrize(
    "backend, examples", [(None, 20), ("torch", 20), ("triton", 3)], ids=["default", "torch", "triton"]
)
def test_nan_adapter_changes_no_other_row_property(nan_banks, backend, examples):
    """In any mixed batch (LoRA, bottleneck, prefix and base rows, any lengths), filling one adapter with
    NaN changes no other row."""
    choices = [*NAN_ADAPTERS, None]
    longest = 3 if backend == "triton" else 10

    @settings(max_examples=examples, **HYPOTHESIS)
    @given(
        names=st.lists(st.sampled_from(choices), min_size=1, max_size=4 if backend == "triton" else 7),
        bad=st.sampled_from(list(NAN_ADAPTERS)),
        data=st.data(),
    )
    def check(names, bad, data):
        lengths = data.draw(st.lists(st.integers(1, longest), min_size=len(names), max_size=len(names)))
        assert_nan_isolated(nan_banks, names, bad, lengths, backend)

    check()
