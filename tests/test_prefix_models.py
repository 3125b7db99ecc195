"""Prefix tuning, prompt tuning and P-tuning on tiny random models.

The reference for prefix tuning is independent of fastadapters' attention: the UNPATCHED model, with the
prefix fed as a P-token DynamicCache, the attention mask extended by P ones and the real tokens'
positions given explicitly (BLOOM: ALiBi built for the real tokens, zero for the prefix). Generation is
checked against manual loops over that reference (greedy, sampling, beam search), not against peft,
whose prefix tuning ignores the prefix in generate().
"""

import functools
import inspect

import pytest
import torch
import transformers
from conftest import assert_close
from models import VOCAB, llama_7b_on_meta, tiny_model
from transformers import DynamicCache

import fastadapters as fa
from fastadapters import prefix as prefix_mod
from fastadapters.families import attention_paths
from fastadapters.ops import use_backend
from fastadapters.patch import adapter_named_parameters

FAMILIES = ("llama", "mistral", "qwen2", "gptj", "gpt_neox", "bloom")
EXTRA_FAMILIES = ("gpt2", "opt")
P = 5
EOS = 2
F32 = torch.float32


def attention_modules(model):
    return [model.get_submodule(path) for path in attention_paths(model)[0]]


def prefixes_of(model):
    """[(key, value)] per layer, each [Hkv, P, D], detached fp32 copies."""
    return [
        tuple(t.detach().float().clone() for t in m.fastadapters_prefix.key_value(F32))
        for m in attention_modules(model)
    ]


def left_padded_batch(seed=0, B=3, S=9):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, S), generator=gen)
    mask = torch.ones(B, S, dtype=torch.long)
    for row, pad in zip(range(1, B), (3, 6, 1)):
        mask[row, :pad] = 0
    return ids, mask


def cache_argument(model) -> str:
    """The name under which the model's forward takes a cache: `cache` (transformers 5.24) or
    `past_key_values` (5.17, whose **kwargs would swallow `cache` silently)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def reference_logits(model, prefixes, ids, mask, position_ids):
    """Logits of the unpatched model attending to `prefixes` through a P-token cache."""
    B = ids.shape[0]
    cache = DynamicCache(config=model.config)
    for layer, (k, v) in enumerate(prefixes):
        cache.update(k.expand(B, *k.shape).contiguous(), v.expand(B, *v.shape).contiguous(), layer)
    n_prefix = prefixes[0][0].shape[1]
    full_mask = torch.cat([torch.ones(B, n_prefix, dtype=mask.dtype, device=mask.device), mask], dim=1)
    kwargs = {"input_ids": ids, "attention_mask": full_mask, cache_argument(model): cache, "use_cache": True}
    if model.config.model_type == "bloom":
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        heads = model.config.n_head

        def alibi(mask2d, num_heads, dtype):  # zero bias on the prefix, ALiBi of the real tokens after it
            real = build_alibi_tensor(mask2d[:, n_prefix:], num_heads, dtype)
            return torch.cat([torch.zeros(B * heads, 1, n_prefix, dtype=dtype), real], dim=-1)

        model.transformer.build_alibi_tensor = alibi
        try:
            return model(**kwargs).logits
        finally:
            del model.transformer.build_alibi_tensor
    return model(**kwargs, position_ids=position_ids).logits


def default_positions(model, mask):
    """The positions a model uses when given none: 0..S-1, except OPT, which counts only real tokens."""
    if model.config.model_type == "opt":
        return mask.cumsum(-1) * mask - 1
    return torch.arange(mask.shape[1]).expand_as(mask)


def generate_positions(mask):
    """What generate() uses: cumsum of the mask minus one, 0 at padding."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


@functools.cache
def refused(family) -> bool:
    """Whether this transformers refuses to route `family`'s attention through fastadapters' (GPT-J under
    5.17): fa.apply then raises NotImplementedError (test_apply_switches_the_attention_or_refuses_clearly)."""
    try:
        fa.apply(tiny_model(family), fa.PrefixConfig(num_virtual_tokens=P))
    except NotImplementedError:
        return True
    return False


def patched(family, seed=0, boost=1.0, lively=False, **config):
    """A tiny model with a prefix. `boost` scales the prefix; `lively` draws the weights with std 0.3 (at
    the default 0.02 a tiny model's greedy output just repeats the last token, whatever the prefix)."""
    if refused(family):
        pytest.skip(f"transformers {transformers.__version__} cannot switch {family}'s attention at run time")
    model = tiny_model(family, seed=seed, **(dict(initializer_range=0.3) if lively else {}))
    fa.apply(model, fa.PrefixConfig(num_virtual_tokens=P, **config))
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.mul_(boost)
    return model


# ------------------------------------------------------------------------------------------ logits


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_patched_logits_equal_concatenation_reference(family):
    model = patched(family)
    ids, mask = left_padded_batch()
    out = model(input_ids=ids, attention_mask=mask).logits
    no_pad = model(input_ids=ids[:1]).logits  # no mask at all: the op's plain causal path
    prefixes = prefixes_of(model)
    fa.remove(model)
    ref = reference_logits(model, prefixes, ids, mask, default_positions(model, mask))
    keep = mask.bool()  # padded query rows are not compared (their softmax differs only in masked keys)
    assert_close(out[keep], ref[keep], F32, name=f"{family} logits")
    assert_close(no_pad, ref[:1], F32, name=f"{family} logits without mask")
    base = model(input_ids=ids, attention_mask=mask).logits
    assert (out[keep] - base[keep]).abs().max() > 1e-2, "the prefix must change the output"


@pytest.mark.parametrize("family", FAMILIES + EXTRA_FAMILIES)
def test_apply_switches_the_attention_or_refuses_clearly(family):
    """After fa.apply the registry families' attention is fastadapters'; where transformers refuses to switch
    it (GPT-J under 5.17 only logs a warning), apply raises and leaves the model as it was."""
    model = tiny_model(family)
    route = attention_paths(model)[1]
    if refused(family):
        with pytest.raises(NotImplementedError, match=f"model_type '{family}'.*transformers"):
            fa.apply(model, fa.PrefixConfig(num_virtual_tokens=P))
        assert model.config._attn_implementation != prefix_mod.ATTENTION_NAME
        assert not hasattr(model, "fastadapters_config")
        assert not [m for m in model.modules() if hasattr(m, prefix_mod.PREFIX_ATTR)]
        return
    fa.apply(model, fa.PrefixConfig(num_virtual_tokens=P))
    if route == "registry":
        assert model.config._attn_implementation == prefix_mod.ATTENTION_NAME
    assert (
        len([m for m in model.modules() if hasattr(m, prefix_mod.PREFIX_ATTR)])
        == model.config.num_hidden_layers
    )


def test_a_refused_attention_switch_raises_and_undoes_apply(monkeypatch):
    """A set_attn_implementation that does nothing (what transformers 5.17 does for GPT-J): apply must raise
    a NotImplementedError naming the model type, and leave neither prefix nor switched config behind."""
    model = tiny_model("llama")
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
    previous = model.config._attn_implementation
    switch = type(model).set_attn_implementation  # the structure's traced forward still switches for itself

    def refuse(self, name):
        return None if name == prefix_mod.ATTENTION_NAME else switch(self, name)

    monkeypatch.setattr(type(model), "set_attn_implementation", refuse)
    with pytest.raises(NotImplementedError, match="model_type 'llama'.*refused to switch"):
        fa.apply(model, fa.PrefixConfig(num_virtual_tokens=P))
    assert model.config._attn_implementation == previous
    assert not [m for m in model.modules() if hasattr(m, prefix_mod.PREFIX_ATTR)]
    assert not hasattr(model, "fastadapters_config")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, before)


def test_projection_logits_and_fold():
    model = patched("llama", prefix_projection=True, encoder_hidden_size=24)
    ids, mask = left_padded_batch()
    names = {n for n, _ in adapter_named_parameters(model)}
    assert all(n.startswith("fastadapters_prefix_encoder.") for n in names), names
    out = model(input_ids=ids, attention_mask=mask).logits
    prefixes = prefixes_of(model)
    fa.fold_prefix(model)
    assert model.fastadapters_config.prefix_projection is False
    assert not hasattr(model, "fastadapters_prefix_encoder")
    folded = model(input_ids=ids, attention_mask=mask).logits
    assert_close(folded, out, F32, name="folded logits")
    trainable, _ = fa.trainable_parameters(model)
    L, Hkv, D = 2, 2, 16
    assert trainable == L * 2 * Hkv * P * D
    fa.remove(model)
    ref = reference_logits(model, prefixes, ids, mask, torch.arange(ids.shape[1]).expand_as(ids))
    keep = mask.bool()
    assert_close(out[keep], ref[keep], F32, name="projection logits")


def test_triton_backend_in_a_model(device):
    """The interpreter on the CPU; the compiled kernels under FASTADAPTERS_TEST_DEVICE=cuda."""
    model = tiny_model("llama", num_hidden_layers=1).to(device)
    fa.apply(model, fa.PrefixConfig(num_virtual_tokens=3))
    ids, mask = (t.to(device) for t in left_padded_batch(B=2, S=6))
    with use_backend("triton"):
        out = model(input_ids=ids, attention_mask=mask).logits
    prefixes = prefixes_of(model)
    fa.remove(model)
    ref = reference_logits(model, prefixes, ids, mask, torch.arange(6, device=device).expand_as(ids))
    keep = mask.bool()
    assert_close(out[keep], ref[keep], F32, name="triton logits")


def test_prefix_gradients_flow_and_training_lowers_the_loss():
    model = patched("qwen2")
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in adapter_named_parameters(model)
    }
    opt = torch.optim.Adam(params, lr=3e-2)
    first = None
    model.train()
    for _ in range(8):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        opt.step()
    assert loss.item() < first - 0.05


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "gptj", "bloom"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_prefix_under_autocast(family, dtype):
    """fp32 weights under CPU autocast: rotary embeddings leave q and k in fp32 and v in `dtype`; attention
    runs in autocast's dtype, its logits match fp32's within that dtype's tolerance, and gradients reach
    the (fp32) prefix."""
    model = patched(family)
    ids, mask = left_padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
    with torch.autocast("cpu", dtype=dtype):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    keep = mask.bool()
    assert_close(out.logits[keep], full[keep], dtype, name=f"{family} logits under {dtype} autocast")
    out.loss.backward()
    grads = [p.grad for _, p in adapter_named_parameters(model)]
    assert all(
        g is not None and g.dtype == F32 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads
    )


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_leaves_a_model_sharing_its_config_alone(family, tmp_path):
    """Two models built from one config object: apply / load of a prefix on one must not switch the other's
    attention implementation (transformers' set_attn_implementation writes into the config)."""
    from models import tiny_config

    cfg = tiny_config(family)
    models = []
    for _ in range(3):  # three identical models that share `cfg`
        torch.manual_seed(0)
        models.append(transformers.AutoModelForCausalLM.from_config(cfg).eval())
    prefixed, other, loaded = models
    assert other.config is cfg and prefixed.config is cfg
    ids, mask = left_padded_batch()
    with torch.no_grad():
        before = other(input_ids=ids, attention_mask=mask).logits
    fa.apply(prefixed, fa.PrefixConfig(num_virtual_tokens=P))
    fa.save(prefixed, tmp_path)
    fa.load(loaded, tmp_path)
    assert prefixed.config._attn_implementation == prefix_mod.ATTENTION_NAME
    assert other.config._attn_implementation != prefix_mod.ATTENTION_NAME
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids, attention_mask=mask).logits, before)
        assert_close(loaded(input_ids=ids).logits, prefixed(input_ids=ids).logits, F32, name="loaded logits")
    fa.remove(prefixed)
    with torch.no_grad():
        assert torch.equal(prefixed(input_ids=ids, attention_mask=mask).logits, before)
        assert torch.equal(other(input_ids=ids, attention_mask=mask).logits, before)


# ------------------------------------------------------------------------------------------ generate


def reference_step_logits(model, prefixes, ids, mask):
    return reference_logits(model, prefixes, ids, mask, generate_positions(mask))[:, -1].float()


def greedy_reference(model, prefixes, ids, mask, steps):
    for _ in range(steps):
        logits = reference_step_logits(model, prefixes, ids, mask)
        logits[:, EOS] = float("-inf")  # generate runs with min_new_tokens=steps, which bans EOS
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_equals_manual_loop_with_prefix(family):
    model = patched(family, boost=4.0, lively=True)
    ids, mask = left_padded_batch(seed=1)
    steps = 5
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )
    prefixes = prefixes_of(model)
    fa.remove(model)
    expected = greedy_reference(model, prefixes, ids, mask, steps)
    assert torch.equal(out, expected), (
        f"{family}: generate {out[:, -steps:]} vs reference {expected[:, -steps:]}"
    )
    plain = model.generate(
        ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )
    assert not torch.equal(plain, out), "the prefix must change what is generated (peft 0.21 ignores it)"


def test_sampling_generate_uses_the_prefix():
    model = patched("llama", boost=4.0, lively=True)
    ids, mask = left_padded_batch(seed=2)
    steps = 4
    torch.manual_seed(123)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=True, top_k=0,
        top_p=1.0, temperature=1.0, pad_token_id=0,
    )  # fmt: skip
    prefixes = prefixes_of(model)
    fa.remove(model)
    torch.manual_seed(123)
    seq, m = ids, mask
    for _ in range(steps):  # what generate's sampler does: softmax, then one multinomial draw per row
        logits = reference_step_logits(model, prefixes, seq, m)
        logits[:, EOS] = float("-inf")
        nxt = torch.multinomial(torch.softmax(logits, -1), num_samples=1)
        seq = torch.cat([seq, nxt], dim=1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
    assert torch.equal(out, seq)


def beam_reference(model, prefixes, ids, mask, steps, beams):
    """Plain beam search over the reference model, one prompt at a time (EOS banned; equal lengths, so
    the length penalty does not change the ranking)."""
    best = []
    for row in range(ids.shape[0]):
        hyps = [(0.0, ids[row : row + 1], mask[row : row + 1])]
        for _ in range(steps):
            seqs = torch.cat([h[1] for h in hyps])
            masks = torch.cat([h[2] for h in hyps])
            logp = torch.log_softmax(reference_step_logits(model, prefixes, seqs, masks), -1)
            logp[:, EOS] = float("-inf")
            cands = [
                (hyps[i][0] + logp[i, t].item(), i, t) for i in range(len(hyps)) for t in range(logp.shape[1])
            ]
            cands.sort(key=lambda c: -c[0])
            hyps = [
                (
                    score,
                    torch.cat([hyps[i][1], torch.tensor([[t]])], 1),
                    torch.cat([hyps[i][2], torch.ones(1, 1, dtype=torch.long)], 1),
                )
                for score, i, t in cands[:beams]
            ]
        best.append(hyps[0][1])
    return torch.cat(best)


@pytest.mark.parametrize("family", ("llama", "gpt_neox", "bloom"))
def test_beam_search_equals_manual_beam_search_with_prefix(family):
    model = patched(family, boost=4.0, lively=True)
    ids, mask = left_padded_batch(seed=3)
    steps, beams = 3, 3
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, num_beams=beams,
        do_sample=False, early_stopping=True, pad_token_id=0,
    )  # fmt: skip
    prefixes = prefixes_of(model)
    fa.remove(model)
    assert torch.equal(out, beam_reference(model, prefixes, ids, mask, steps, beams))


# ------------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize(
    "config",
    [
        fa.PrefixConfig(num_virtual_tokens=4),
        fa.PrefixConfig(num_virtual_tokens=4, prefix_projection=True, encoder_hidden_size=8),
        fa.PromptTuningConfig(num_virtual_tokens=4),
        fa.PTuningConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=8),
    ],
    ids=["prefix", "prefix-projection", "prompt", "p-tuning"],
)
@pytest.mark.parametrize("family", ("llama", "bloom"))
def test_save_load_remove_roundtrip(family, config, tmp_path):
    ids, mask = left_padded_batch()
    model = tiny_model(family)
    base = model(input_ids=ids, attention_mask=mask).logits
    fa.apply(model, config)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.add_(torch.randn_like(p) * 0.1)
    out = model(input_ids=ids, attention_mask=mask).logits
    assert out.shape == base.shape
    fa.save(model, tmp_path)
    fa.remove(model)
    assert_close(model(input_ids=ids, attention_mask=mask).logits, base, F32, name="after remove")
    assert not [n for n, _ in model.named_parameters() if "fastadapters" in n]
    fa.load(model, tmp_path)
    assert model.fastadapters_config == config
    assert_close(model(input_ids=ids, attention_mask=mask).logits, out, F32, name="after load")


def test_trainable_count_llama_7b_shapes_is_the_papers():
    model = llama_7b_on_meta()
    fa.apply(model, fa.PrefixConfig(num_virtual_tokens=30))
    trainable, total = fa.trainable_parameters(model)
    assert trainable == 32 * 2 * 30 * 4096
    assert f"{100 * trainable / total:.4f}" == "0.1166"


# ------------------------------------------------------------------------------------------ prompts


def virtual_reference(model, virtual, ids, mask):
    """Unpatched model on [virtual; embed(ids)] with the mask extended by ones: logits of all positions."""
    emb = model.get_input_embeddings()(ids)
    B = ids.shape[0]
    embeds = torch.cat([virtual.expand(B, -1, -1), emb], dim=1)
    full = torch.cat([torch.ones(B, virtual.shape[1], dtype=mask.dtype), mask], dim=1)
    return model(inputs_embeds=embeds, attention_mask=full).logits


@pytest.mark.parametrize(
    "config",
    [fa.PromptTuningConfig(num_virtual_tokens=3), fa.PTuningConfig(num_virtual_tokens=3, encoder="mlp")],
    ids=["prompt", "p-tuning"],
)
def test_prompt_logits_labels_and_generate(config):
    model = tiny_model("llama")
    fa.apply(model, config)
    ids, mask = left_padded_batch(seed=4)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    virtual = model.fastadapters_prompt().detach().unsqueeze(0)
    n = virtual.shape[1]
    steps = 4
    gen = model.generate(
        ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0
    )
    fa.remove(model)
    ref = virtual_reference(model, virtual, ids, mask)
    assert out.logits.shape == ids.shape + (VOCAB,), "logits line up with input_ids"
    assert_close(out.logits[mask.bool()], ref[:, n:][mask.bool()], F32, name="prompt logits")
    # Labels are -100 at the virtual positions: the loss covers the real tokens only.
    full_labels = torch.cat([torch.full((ids.shape[0], n), -100), labels], dim=1)
    expect = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, VOCAB), full_labels[:, 1:].reshape(-1))
    assert_close(out.loss, expect, F32, name="prompt loss")
    seq, m = ids, mask
    for _ in range(steps):
        logits = virtual_reference(model, virtual, seq, m)[:, -1]
        logits[:, EOS] = float("-inf")
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert torch.equal(gen, seq)


class _WordTokenizer:
    """A tokenizer stand-in: one id per word."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [10 + len(w) for w in text.split()]}


def test_prompt_text_init_copies_word_embeddings(tmp_path):
    cfg = fa.PromptTuningConfig(
        num_virtual_tokens=5, init="text", init_text="a bb ccc", tokenizer=_WordTokenizer()
    )
    assert cfg.init_token_ids == [11, 12, 13]
    model = tiny_model("gpt_neox")
    fa.apply(model, cfg)
    words = model.get_input_embeddings().weight[torch.tensor([11, 12, 13, 11, 12])]
    assert torch.equal(model.fastadapters_prompt().detach(), words)
    fa.save(model, tmp_path)  # the token ids travel with the config: no tokenizer needed to load
    fa.remove(model)
    fa.load(model, tmp_path)
    assert model.fastadapters_config == cfg and torch.equal(model.fastadapters_prompt().detach(), words)


@pytest.mark.parametrize(
    "config",
    [
        fa.PromptTuningConfig(num_virtual_tokens=4),
        fa.PTuningConfig(num_virtual_tokens=4, encoder="lstm", encoder_hidden_size=16),
        fa.PrefixConfig(num_virtual_tokens=4),
    ],
    ids=["prompt", "p-tuning", "prefix"],
)
def test_hf_trainer_steps_lower_the_loss(config, tmp_path):
    model = tiny_model("llama")
    fa.apply(model, config)
    ids, mask = left_padded_batch(seed=5, B=4, S=8)
    labels = ids.masked_fill(mask == 0, -100)
    rows = [dict(input_ids=i, attention_mask=m, labels=lab) for i, m, lab in zip(ids, mask, labels)]

    def loss():
        model.eval()
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()

    before = loss()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-1,
        report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    assert loss() < before - 0.05


# ------------------------------------------------------------------------------------------ bad input


def test_bad_configs_raise():
    for cls in (fa.PrefixConfig, fa.PromptTuningConfig, fa.PTuningConfig):
        with pytest.raises(ValueError, match="num_virtual_tokens"):
            cls(num_virtual_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        fa.PromptTuningConfig(num_virtual_tokens=3, init="text", init_text="hello")
    with pytest.raises(ValueError, match="encoder"):
        fa.PTuningConfig(num_virtual_tokens=3, encoder="gru")
    # Types are checked as a saved config would carry them: no truthy strings, no bools as ints.
    with pytest.raises(ValueError, match=r"prefix_projection must be True or False, got 'false' \(str\)"):
        fa.PrefixConfig(num_virtual_tokens=3, prefix_projection="false")
    with pytest.raises(ValueError, match="num_virtual_tokens must be an integer >= 1, got True"):
        fa.PrefixConfig(num_virtual_tokens=True)
    with pytest.raises(ValueError, match="encoder_hidden_size must be None or an integer >= 1"):
        fa.PTuningConfig(num_virtual_tokens=3, encoder_hidden_size="64")
    with pytest.raises(ValueError, match="init_token_ids must be a non-empty list"):
        fa.PromptTuningConfig(num_virtual_tokens=3, init="text", init_token_ids=5)
    with pytest.raises(ValueError, match=r"PromptTuningConfig needs the field\(s\) \['num_virtual_tokens'\]"):
        fa.config.config_from_dict({"adapter_type": "prompt_tuning"})
    with pytest.raises(ValueError, match="adapter_type must be one of"):
        fa.config.config_from_dict({"adapter_type": ["prefix"]})


def test_prefix_of_another_model_shape_is_refused(tmp_path):
    model = patched("llama")
    fa.save(model, tmp_path)
    other = tiny_model("llama", num_key_value_heads=4)  # prefix heads differ (4 instead of 2)
    with pytest.raises(ValueError, match="shape"):
        fa.load(other, tmp_path)
    assert getattr(other, "fastadapters_config", None) is None
    assert other.config._attn_implementation != prefix_mod.ATTENTION_NAME


def test_unsupported_family_and_attention_dropout_raise():
    class Unknown(torch.nn.Module):
        config = transformers.PretrainedConfig()

    with pytest.raises(ValueError, match="model_type"):
        fa.apply(Unknown(), fa.PrefixConfig())
    model = tiny_model("llama", attention_dropout=0.1)
    fa.apply(model, fa.PrefixConfig(num_virtual_tokens=2))
    model.train()
    with pytest.raises(NotImplementedError, match="dropout"):
        model(input_ids=torch.randint(3, VOCAB, (1, 4)))


def test_prompt_tuning_needs_input_embeddings():
    class NoEmbeddings(torch.nn.Module):  # a model with a family but nothing to prepend embeddings to
        config = transformers.LlamaConfig(hidden_size=8, num_attention_heads=2, num_hidden_layers=1)

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)

    class EmbeddingsNone(NoEmbeddings):
        def get_input_embeddings(self):
            return None

    for model in (NoEmbeddings(), EmbeddingsNone()):
        for config in (fa.PromptTuningConfig(num_virtual_tokens=2), fa.PTuningConfig(num_virtual_tokens=2)):
            with pytest.raises(ValueError, match=f"{type(model).__name__} has no input embeddings"):
                fa.apply(model, config)
            assert getattr(model, "fastadapters_config", None) is None
            assert not hasattr(model, prefix_mod.PROMPT_ATTR)


def test_prompt_rejects_4d_masks():
    model = tiny_model("llama")
    fa.apply(model, fa.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(
            input_ids=torch.randint(3, VOCAB, (1, 4)), attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool)
        )


def test_positions_are_not_shifted():
    """Documented semantics: real tokens keep positions 0..S-1 (the prefix is position-free)."""
    model = patched("llama")
    ids = torch.randint(3, VOCAB, (1, 6))
    a = model(input_ids=ids).logits
    b = model(input_ids=ids, position_ids=torch.arange(6)[None]).logits
    assert_close(a, b, F32)
