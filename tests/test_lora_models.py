"""LoRA on tiny random models of every family: fastadapters equals peft number for number (logits, adapter
and input gradients), through save/load, PEFT import/export, merge/unmerge, grouping, gradient
checkpointing, generate and the HF Trainer; bad input is refused and leaves the model untouched."""

import copy

import peft
import pytest
import torch
from conftest import assert_close
from models import FAMILIES, VOCAB, tiny_model, trainer_loss_before_after
from transformers.pytorch_utils import Conv1D

import fastadapters
from fastadapters.families import lora_targets
from fastadapters.layers import LoraLinear
from fastadapters.patch import adapter_named_parameters

R, ALPHA = 4, 8
ATOL_RTOL_MODEL = torch.float32  # model-level comparisons use the fp32 row of the tolerance table


def all_linear_targets(model) -> list[str]:
    """Leaf names of every linear layer except the output head (what peft's "all-linear" means)."""
    return sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, Conv1D)) and not n.endswith("lm_head")
        }
    )


def peft_key(name: str) -> str:
    """Our adapter parameter name -> peft's state_dict key for the default adapter."""
    name = name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
    return "base_model.model." + name


def randomize_adapter(model, seed: int = 1) -> None:
    """Non-zero A and B, so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapter_named_parameters(model):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def make_pair(family: str, targets=None, dropout: float = 0.0, seed: int = 0):
    """(base, ours, theirs): one base model, patched by fastadapters and by peft with the same A/B."""
    base = tiny_model(family, seed=seed)
    names = list(targets) if targets is not None else sorted(lora_targets(base, fastadapters.LoraConfig()))
    ours = fastadapters.apply(
        copy.deepcopy(base),
        fastadapters.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=targets),
    )
    randomize_adapter(ours)
    cfg = peft.LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=names, fan_in_fan_out=family == "gpt2"
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    copy_adapter(ours, theirs)
    return base, ours, theirs


def copy_adapter(ours, theirs) -> None:
    """Copies our A/B into a peft model; both must have exactly the same adapter tensors."""
    state = theirs.state_dict()
    lora_keys = {k for k in state if ".lora_" in k}
    ours_params = dict(adapter_named_parameters(ours))
    assert {peft_key(n) for n in ours_params} == lora_keys
    with torch.no_grad():
        for name, p in ours_params.items():
            state[peft_key(name)].copy_(p)


def inputs(batch: int = 2, seq: int = 11, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def run(model, ids, adapter_of=None):
    """(logits, {name: grad}) for a loss on the logits; grads of the adapter params and input embeddings.

    `adapter_of` maps a parameter name to a key shared by both libraries (peft names are mapped to ours).
    """
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    weights = torch.linspace(-1, 1, logits.shape[-1])
    (logits * weights).square().mean().backward()
    grads = {"inputs_embeds": embeds.grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grads[adapter_of(name) if adapter_of else name] = p.grad
    return logits.detach(), grads


def our_name(peft_name: str) -> str:
    return peft_name.removeprefix("base_model.model.").replace(".default.", ".")


def assert_same(ours, theirs, ids, what=""):
    lo, go = run(ours, ids)
    lt, gt = run(theirs, ids, adapter_of=our_name)
    assert_close(lo, lt, torch.float32, name=f"{what} logits")
    assert set(go) == set(gt), f"{what}: trainable sets differ: {set(go) ^ set(gt)}"
    for name in go:
        assert go[name] is not None, f"{what}: no gradient for {name}"
        assert_close(go[name], gt[name], torch.float32, name=f"{what} grad {name}")


def snapshot(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before: dict) -> None:
    after = model.state_dict()
    assert set(after) == set(before), f"state_dict keys changed: {set(after) ^ set(before)}"
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"
    assert getattr(model, "fastadapters_config", None) is None
    assert not any(isinstance(m, LoraLinear) for m in model.modules())


# ---------------------------------------------------------------------------------------------------------
# Equality with peft, through files (ours and PEFT's, both ways) and merge/unmerge


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_peft_export_merge(family, tmp_path):
    """Default targets: equal to peft; our PEFT export loads in peft; merge and unmerge change nothing."""
    base, ours, theirs = make_pair(family)
    ids = inputs()
    assert_same(ours, theirs, ids, f"{family} default")

    fastadapters.save_peft(ours, tmp_path / "p")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p", is_trainable=True)
    assert_same(ours, reloaded, ids, f"{family} save_peft -> PeftModel.from_pretrained")

    before = base.state_dict()
    with torch.no_grad():
        unmerged = ours(ids).logits
        fastadapters.merge(ours)
        assert all(m.merged for m in ours.modules() if isinstance(m, LoraLinear))
        merged = ours(ids).logits
        assert_close(merged, unmerged, torch.float32, name=f"{family} merged vs unmerged")
        assert_close(merged, theirs(ids).logits, torch.float32, name=f"{family} merged vs peft")
        fastadapters.unmerge(ours)
    for name, m in ours.named_modules():
        if isinstance(m, LoraLinear):
            assert_close(m.base_layer.weight, before[f"{name}.weight"], name=f"{name} weight after unmerge")
    assert_same(ours, theirs, ids, f"{family} after unmerge")
    fastadapters.remove(ours)
    for k, v in base.state_dict().items():
        assert_close(ours.state_dict()[k], v, name=f"{k} after remove")


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_save_load_peft_import(family, tmp_path):
    """Every linear layer: equal to peft; after our save/load; after peft save_pretrained -> load_peft."""
    targets = all_linear_targets(tiny_model(family))
    base, ours, theirs = make_pair(family, targets=targets)
    ids = inputs()
    n_lora = sum(isinstance(m, LoraLinear) for m in ours.modules())
    assert (
        n_lora == sum(isinstance(m, torch.nn.Linear | Conv1D) for m in base.modules()) - 1
    )  # all but lm_head
    assert fastadapters.trainable_parameters(ours)[0] == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
    assert_same(ours, theirs, ids, f"{family} all-linear")

    fastadapters.save(ours, tmp_path / "fa")
    loaded = fastadapters.load(copy.deepcopy(base), tmp_path / "fa")
    assert loaded.fastadapters_config == ours.fastadapters_config
    assert_same(loaded, theirs, ids, f"{family} after save/load")

    theirs.save_pretrained(tmp_path / "p")
    imported = fastadapters.load_peft(copy.deepcopy(base), tmp_path / "p")
    assert_same(imported, theirs, ids, f"{family} peft save_pretrained -> load_peft")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_more_tokens_than_features(family):
    """80 tokens over width 64: the torch backend folds B A into W (grouped q/k/v, GPT-2's Conv1D)."""
    _, ours, theirs = make_pair(family, targets=all_linear_targets(tiny_model(family)))
    with fastadapters.ops.use_backend("torch"):
        assert_same(ours, theirs, inputs(batch=4, seq=20), f"{family} 80 tokens")


def test_adapter_changes_output():
    """Guards the comparisons above: with non-zero B the adapter really matters."""
    base, ours, _ = make_pair("llama")
    ids = inputs()
    diff = (ours(ids).logits - base(ids).logits).abs().max()
    assert diff > 1e-2


# ---------------------------------------------------------------------------------------------------------
# Grouped q/k/v and gate/up


@pytest.mark.parametrize("family", ["llama", "gptj"])
def test_grouped_equals_ungrouped(family):
    targets = all_linear_targets(tiny_model(family))
    _, grouped, theirs = make_pair(family, targets=targets)
    groups = {id(m.group) for m in grouped.modules() if isinstance(m, LoraLinear) and m.group is not None}
    assert len(groups) == (4 if family == "llama" else 2)  # per layer: q/k/v (+ gate/up on llama)
    calls = []
    orig = fastadapters.ops.lora_linear_grouped
    fastadapters.layers.ops.lora_linear_grouped = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        lg, gg = run(grouped, inputs())
    finally:
        fastadapters.layers.ops.lora_linear_grouped = orig
    assert len(calls) == len(groups), "each group should run one grouped op per forward"
    ungrouped = copy.deepcopy(grouped)
    for m in ungrouped.modules():
        if isinstance(m, LoraLinear):
            m.group = None
    lu, gu = run(ungrouped, inputs())
    assert_close(lg, lu, torch.float32, name="grouped vs ungrouped logits")
    for name in gg:
        assert_close(gg[name], gu[name], torch.float32, name=f"grouped vs ungrouped grad {name}")
    assert_same(grouped, theirs, inputs(), f"{family} grouped vs peft")


# ---------------------------------------------------------------------------------------------------------
# Gradient checkpointing and generate


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_checkpointing(family):
    """Same grads with checkpointing (as HF/PEFT enable it); dropout masks are recomputed identically."""
    overrides = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if family == "gpt2" else {}
    base = tiny_model(family, **overrides)
    targets = all_linear_targets(base)
    model = fastadapters.apply(
        base, fastadapters.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.1, target_modules=targets)
    )
    randomize_adapter(model)
    model.train()
    ids = inputs()

    def grads(m):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        loss = m(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    plain_loss, plain = grads(model)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable()
    ckpt.enable_input_require_grads()
    assert ckpt.is_gradient_checkpointing
    ckpt_loss, ckpt_grads = grads(ckpt)
    assert_close(ckpt_loss, plain_loss, torch.float32, name="loss with checkpointing")
    for name, g in plain.items():
        assert_close(ckpt_grads[name], g, torch.float32, name=f"checkpointed grad {name}")


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_generate_matches_peft(family):
    _, ours, theirs = make_pair(family, targets=all_linear_targets(tiny_model(family)))
    ids = inputs(batch=2, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        a = ours.generate(ids, **kw)
        b = theirs.generate(input_ids=ids, **kw)
    assert a.shape == (2, 11)
    assert torch.equal(a, b), f"greedy tokens differ:\n{a}\n{b}"


# ---------------------------------------------------------------------------------------------------------
# HF Trainer


def test_trainer_lowers_loss(tmp_path):
    model = fastadapters.apply(
        tiny_model("llama"),
        fastadapters.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]
        ),
    )
    before, after = trainer_loss_before_after(model, tmp_path, learning_rate=1e-2)
    assert after < before - 0.1, f"loss did not fall: {before:.4f} -> {after:.4f}"
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)


# ---------------------------------------------------------------------------------------------------------
# Bad input to apply(): a clear error naming the argument, the model untouched


class _Mystery(torch.nn.Module):
    """A model of no known family."""

    def __init__(self):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "mystery"})()
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.proj(x))


@pytest.mark.parametrize(
    "make_config, error, words",
    [
        (lambda: fastadapters.LoraConfig(r=0), ValueError, ["r ", "rank", "0"]),
        (lambda: fastadapters.LoraConfig(r=2.5), ValueError, ["r ", "2.5"]),
        (lambda: fastadapters.LoraConfig(lora_alpha=-1), ValueError, ["lora_alpha"]),
        (lambda: fastadapters.LoraConfig(lora_dropout=1.0), ValueError, ["lora_dropout"]),
        (lambda: fastadapters.LoraConfig(target_modules=[]), ValueError, ["target_modules"]),
        # Types are checked: bools are real bools, ints are not bools, numbers are finite.
        (
            lambda: fastadapters.LoraConfig(use_rslora="no"),
            ValueError,
            ["use_rslora", "True or False", "'no'"],
        ),
        (
            lambda: fastadapters.LoraConfig(init_lora_weights=1),
            ValueError,
            ["init_lora_weights", "True or False"],
        ),
        (
            lambda: fastadapters.LoraConfig(target_modules=5),
            ValueError,
            ["target_modules", "list", "5 (int)"],
        ),
        (lambda: fastadapters.LoraConfig(r=True), ValueError, ["r ", "integer", "True"]),
        (lambda: fastadapters.LoraConfig(r="abc"), ValueError, ["r ", "integer", "'abc' (str)"]),
        (lambda: fastadapters.LoraConfig(lora_alpha=True), ValueError, ["lora_alpha", "number", "True"]),
        (lambda: fastadapters.LoraConfig(lora_alpha=float("nan")), ValueError, ["lora_alpha", "finite"]),
        (lambda: fastadapters.LoraConfig(lora_dropout="x"), ValueError, ["lora_dropout", "[0, 1)", "'x'"]),
        (lambda: fastadapters.LoraConfig(lora_dropout=float("nan")), ValueError, ["lora_dropout", "nan"]),
    ],
)
def test_bad_config_values(make_config, error, words):
    with pytest.raises(error) as info:
        make_config()
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


@pytest.mark.parametrize(
    "model_fn, config, error, words",
    [
        (
            lambda: tiny_model("llama"),
            fastadapters.LoraConfig(target_modules=["q_proj", "nope_proj"]),
            ValueError,
            ["target_modules", "nope_proj"],
        ),
        (
            lambda: tiny_model("llama"),
            fastadapters.LoraConfig(target_modules=["embed_tokens"]),
            ValueError,
            ["embed_tokens", "Embedding"],
        ),
        (
            lambda: _Mystery(),
            fastadapters.LoraConfig(),
            ValueError,
            ["model_type", "mystery", "target_modules"],
        ),
        (lambda: tiny_model("llama"), {"r": 8}, TypeError, ["config", "dict"]),
    ],
    ids=["missing-target", "non-linear-target", "unknown-model-type", "config-type"],
)
def test_apply_refuses_bad_input(model_fn, config, error, words):
    model = model_fn()
    before = snapshot(model)
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(error) as info:
        fastadapters.apply(model, config)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"
    assert_untouched(model, before)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grad_flags


def test_unknown_model_type_with_targets_works():
    model = fastadapters.apply(_Mystery(), fastadapters.LoraConfig(r=2, target_modules=["proj"]))
    assert isinstance(model.proj, LoraLinear) and not isinstance(model.head, LoraLinear)
    assert model(torch.randn(3, 8)).shape == (3, 3)


def test_apply_twice_refused():
    model = fastadapters.apply(tiny_model("llama"), fastadapters.LoraConfig(r=2))
    before = snapshot(model)
    config = model.fastadapters_config
    with pytest.raises(ValueError, match="already has"):
        fastadapters.apply(model, fastadapters.LoraConfig(r=4))
    assert model.fastadapters_config is config
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_remove_restores_model():
    model = tiny_model("gpt2")
    before = snapshot(model)
    fastadapters.apply(model, fastadapters.LoraConfig(r=2, target_modules=all_linear_targets(model)))
    randomize_adapter(model)
    fastadapters.merge(model)
    fastadapters.remove(model)
    assert all(p.requires_grad for p in model.parameters())
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert_close(after[k], v, name=k)
    with pytest.raises(ValueError, match="no fastadapters adapter"):
        fastadapters.remove(model)


def test_apply_to_a_bank_served_model_refused():
    """An AdapterBank serves its model in place: fa.apply (or fa.load) would change the bank's outputs."""
    model = tiny_model("llama")
    fastadapters.AdapterBank(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="served by an AdapterBank.*bank.load"):
        fastadapters.apply(model, fastadapters.LoraConfig(r=2))
    assert_untouched(model, before)


# ---------------------------------------------------------------------------------------------------------
# merge / unmerge / remove: the base weights come back bit for bit


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_merge_remove_restores_base_bit_for_bit(dtype):
    """50 cycles of apply -> merge -> remove (rank 16 on every linear layer) leave every base weight
    bit-identical; so do 50 merge -> unmerge cycles of one adapter, and its outputs stay those before."""
    model = tiny_model("llama", dtype=dtype)
    before = snapshot(model)
    targets = all_linear_targets(model)
    config = fastadapters.LoraConfig(r=16, lora_alpha=32, target_modules=targets)
    q_proj = "model.layers.0.self_attn.q_proj.weight"
    for cycle in range(50):
        fastadapters.apply(model, config)
        randomize_adapter(model, seed=cycle)
        fastadapters.merge(model)
        assert not torch.equal(
            model.state_dict()[q_proj.replace(".weight", ".base_layer.weight")], before[q_proj]
        )
        fastadapters.remove(model)
    after = model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} differs after 50 merge -> remove cycles ({dtype})"

    fastadapters.apply(model, config)
    randomize_adapter(model)
    ids = inputs()
    with torch.no_grad():
        unmerged = model(ids).logits
        for _ in range(50):
            fastadapters.merge(model)
            fastadapters.unmerge(model)
        assert torch.equal(model(ids).logits, unmerged), (
            f"outputs changed after 50 merge -> unmerge ({dtype})"
        )
    fastadapters.remove(model)
    assert_untouched(model, before)


def test_merge_keep_base_options():
    """keep_base="cpu" keeps the copies on the CPU in the weight's dtype (exact restore); keep_base=False
    keeps none: remove refuses and leaves the merged model as it was; unmerge subtracts (close, not exact)."""
    model = tiny_model("gpt2", dtype=torch.bfloat16)  # Conv1D layout, a low-precision dtype
    before = snapshot(model)
    config = fastadapters.LoraConfig(r=8, target_modules=all_linear_targets(model))
    fastadapters.apply(model, config)
    randomize_adapter(model)
    fastadapters.merge(model, keep_base="cpu")
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(m.merged_base.device.type == "cpu" for m in layers)
    assert all(m.merged_base.dtype == torch.bfloat16 for m in layers)
    fastadapters.remove(model)
    assert_untouched(model, before)

    fastadapters.apply(model, config)
    randomize_adapter(model)
    fastadapters.merge(model, keep_base=False)
    assert all(m.merged and m.merged_base is None for m in model.modules() if isinstance(m, LoraLinear))
    merged = snapshot(model)
    with pytest.raises(ValueError, match="keep_base=False.*unmerge"):
        fastadapters.remove(model)
    assert model.fastadapters_config is config
    after = model.state_dict()
    assert set(after) == set(merged) and all(torch.equal(after[k], v) for k, v in merged.items())
    fastadapters.unmerge(model)
    fastadapters.remove(model)
    for k, v in before.items():
        assert_close(model.state_dict()[k], v, torch.bfloat16, name=f"{k} after keep_base=False unmerge")

    fastadapters.apply(model, config)
    for bad in ("gpu", None, 1):
        with pytest.raises(ValueError, match="keep_base must be True, False or 'cpu'"):
            fastadapters.merge(model, keep_base=bad)
    assert not any(m.merged for m in model.modules() if isinstance(m, LoraLinear))


def test_backward_through_merged_lora_refused():
    """A merged adapter would get no gradient: backward says so; no_grad inference and unmerge still work."""
    model = fastadapters.apply(tiny_model("llama"), fastadapters.LoraConfig(r=4))
    randomize_adapter(model)
    ids = inputs()
    fastadapters.merge(model)
    loss = model(ids, labels=ids).loss
    with pytest.raises(RuntimeError, match="backward through a merged LoRA layer.*unmerge"):
        loss.backward()
    with torch.no_grad():
        merged = model(ids).logits
    fastadapters.unmerge(model)
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for _, p in adapter_named_parameters(model))
    with torch.no_grad():
        assert_close(model(ids).logits, merged, torch.float32, name="unmerged vs merged logits")
