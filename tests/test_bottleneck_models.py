"""Bottleneck adapters (AdapterH, AdapterP, parallel) on HF models.

The LLaMA-7B trainable-parameter counts of the paper (meta device); on tiny random models of every family,
the placement and the patched logits and gradients equal a plain-torch implementation of the LLM-Adapters
math written here, independently of fastadapters' layers and ops; save/load round trips; the HF Trainer
lowers the loss; bad input is refused and leaves the model untouched.
"""

import copy
import dataclasses

import pytest
import torch
from conftest import assert_close
from models import FAMILIES, VOCAB, llama_7b_on_meta, tiny_model, trainer_loss_before_after
from torch import nn
from transformers.activations import ACT2FN

import fastadapters
from fastadapters.layers import BottleneckAdapter
from fastadapters.ops import use_backend
from fastadapters.patch import adapter_named_parameters

# What LLM-Adapters defines (peft/src/peft/tuners/bottleneck.py and mapping.py), written out independently
# of fastadapters.patch: the kind of every MLP projection, and the default targets of each adapter type.
SERIES_KINDS = {
    "llama": {"gate_proj": "mh", "up_proj": "mh", "down_proj": "output"},
    "mistral": {"gate_proj": "mh", "up_proj": "mh", "down_proj": "output"},
    "qwen2": {"gate_proj": "mh", "up_proj": "mh", "down_proj": "output"},
    "bloom": {"mlp.dense_h_to_4h": "mh", "mlp.dense_4h_to_h": "output"},
    "gpt_neox": {"mlp.dense_h_to_4h": "mh", "mlp.dense_4h_to_h": "output"},
    "gptj": {"mlp.fc_in": "mh", "mlp.fc_out": "output"},
    "opt": {"fc1": "mh", "fc2": "output"},
    "gpt2": {"mlp.c_fc": "mh", "mlp.c_proj": "output"},
}
PARALLEL_DEFAULTS = {
    "llama": ("q_proj", "k_proj", "v_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj"),
    "opt": ("q_proj", "k_proj", "v_proj"),
    "gptj": ("q_proj", "k_proj", "v_proj"),
    "bloom": ("query_key_value",),
    "gpt_neox": ("query_key_value",),
    "gpt2": ("c_attn",),
}
MODES = {
    "adapterh": dict(),
    "adapterp": dict(use_adapterp=True),
    "parallel": dict(use_parallel_adapter=True),
}


def expected_placement(model, family: str, mode: str) -> dict[str, str]:
    """full module name -> kind ("mh", "output", "parallel") that LLM-Adapters' defaults give."""
    names = [n for n, _ in model.named_modules() if n]
    ends = lambda n, key: n == key or n.endswith("." + key)
    if mode == "parallel":
        return {n: "parallel" for n in names if any(ends(n, k) for k in PARALLEL_DEFAULTS[family])}
    kinds = SERIES_KINDS[family]
    wanted = {k: v for k, v in kinds.items() if mode == "adapterh" or v == "output"}
    return {n: kind for n in names for key, kind in wanted.items() if ends(n, key)}


class PlainAdapterLinear(nn.Module):
    """LLM-Adapters' adapter Linear forward, in plain torch: adapter(t) = up(act(down(t))) * scaling;
    mh: base(x + adapter(x)); output: base(x) + adapter(base(x)); parallel: base(x) + adapter(x)."""

    def __init__(self, base, kind, down, up, scaling, non_linearity):
        super().__init__()
        self.base, self.kind, self.act = base, kind, ACT2FN[non_linearity]
        self.down = nn.Parameter(down.detach().clone())
        self.up = nn.Parameter(up.detach().clone())
        self.scaling = (
            nn.Parameter(scaling.detach().clone()) if isinstance(scaling, torch.Tensor) else scaling
        )

    def adapter(self, t):
        return (self.act(t @ self.down.T) @ self.up.T) * self.scaling

    def forward(self, x):
        if self.kind == "mh":
            return self.base(x + self.adapter(x))
        y = self.base(x)
        return y + self.adapter(y if self.kind == "output" else x)


def plain_twin(base_model, patched) -> nn.Module:
    """A copy of base_model with every adapter of `patched` rebuilt as PlainAdapterLinear (same weights)."""
    twin = copy.deepcopy(base_model)
    for name, module in patched.named_modules():
        if isinstance(module, BottleneckAdapter):
            parent, _, child = name.rpartition(".")
            owner = twin.get_submodule(parent) if parent else twin
            plain = PlainAdapterLinear(
                getattr(owner, child),
                module.kind,
                module.adapter_down.weight,
                module.adapter_up.weight,
                module.adapter_scaling,
                module.non_linearity,
            )
            setattr(owner, child, plain)
    return twin


def randomize_adapter(model, seed: int = 1) -> None:
    """Adapter weights large enough that the adapter visibly changes the logits; learned scales off 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in adapter_named_parameters(model):
            if name.endswith("adapter_scaling"):
                p.fill_(0.8)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)  # copy_ moves it to p's device


def inputs(batch: int = 2, seq: int = 9, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=gen)


def logits_and_loss(model, ids):
    out = model(ids, labels=ids)
    return out.logits, out.loss


def patched_and_twin(base, config):
    """`base` patched with `config` (random adapter weights), and its plain-torch twin."""
    model = fastadapters.apply(copy.deepcopy(base), config)
    randomize_adapter(model)
    return model, plain_twin(base, model)


def backward_both(model, twin, ids, what: str):
    """Runs forward and backward on both; asserts equal logits; returns the patched model's logits."""
    logits, loss = logits_and_loss(model, ids)
    plain_logits, plain_loss = logits_and_loss(twin, ids)
    assert_close(logits, plain_logits, torch.float32, f"{what} logits")
    loss.backward()
    plain_loss.backward()
    return logits


def snapshot(model):
    """Everything a failed apply must leave unchanged: parameters, module types, flags, attributes."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: type(m) for n, m in model.named_modules()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        getattr(model, "fastadapters_config", None),
    )


def assert_same(model, snap):
    state, types, flags, cfg = snapshot(model)
    assert types == snap[1] and flags == snap[2] and cfg is snap[3]
    assert state.keys() == snap[0].keys() and all(torch.equal(state[k], snap[0][k]) for k in state)


# --------------------------------------------------------------------------------------------- the paper


def test_llama_7b_trainable_percentages():
    """Series (bottleneck 256 on down_proj) 0.9861% and Parallel (up_proj, down_proj) 3.5423%."""
    cases = [
        (
            fastadapters.BottleneckConfig(bottleneck_size=256, target_modules=["down_proj"]),
            67_108_864,
            "0.9861",
        ),
        (
            fastadapters.BottleneckConfig(
                bottleneck_size=256, use_parallel_adapter=True, target_modules=["up_proj", "down_proj"]
            ),
            247_463_936,
            "3.5423",
        ),
    ]
    for config, trainable_expected, percent in cases:
        model = llama_7b_on_meta()
        base = sum(p.numel() for p in model.parameters())
        fastadapters.apply(model, config)
        trainable, total = fastadapters.trainable_parameters(model)
        assert (trainable, total) == (trainable_expected, base + trainable_expected)
        assert f"{100 * trainable / total:.4f}" == percent
        # No bias on either projection: exactly b·(d_in + d_out) per adapter.
        assert all(
            m.adapter_down.bias is None and m.adapter_up.bias is None
            for m in model.modules()
            if isinstance(m, BottleneckAdapter)
        )


# --------------------------------------------------------------------------------------------- tiny models


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", list(MODES))
def test_placement_and_logits_match_plain_torch(family, mode):
    base = tiny_model(family)
    config = fastadapters.BottleneckConfig(bottleneck_size=8, non_linearity="gelu", **MODES[mode])
    model, twin = patched_and_twin(base, config)
    placed = {n: m.placement for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}
    assert placed == expected_placement(base, family, mode) and placed
    assert all(m.kind == m.placement for m in model.modules() if isinstance(m, BottleneckAdapter))
    ids = inputs()
    logits = backward_both(model, twin, ids, f"{family} {mode}")
    assert not torch.allclose(logits, base(ids).logits, atol=1e-3), "the adapter does not change the logits"
    # Gradients of every adapter weight match the plain twin's.
    plain_params = {n: m for n, m in twin.named_modules() if isinstance(m, PlainAdapterLinear)}
    for name, module in model.named_modules():
        if isinstance(module, BottleneckAdapter):
            twin_module = plain_params[name]
            assert_close(
                module.adapter_down.weight.grad, twin_module.down.grad, torch.float32, f"{name} d_down"
            )
            assert_close(module.adapter_up.weight.grad, twin_module.up.grad, torch.float32, f"{name} d_up")
    assert all(p.grad is None for n, p in model.named_parameters() if "adapter_" not in n)


@pytest.mark.parametrize("activation", ["tanh", "relu", "silu", "sigmoid"])
def test_activations_and_learned_scaling_on_llama(activation):
    base = tiny_model("llama")
    config = fastadapters.BottleneckConfig(bottleneck_size=6, non_linearity=activation, scaling="learned")
    model, twin = patched_and_twin(base, config)
    backward_both(model, twin, inputs(), activation)
    ours = [m.adapter_scaling.grad for m in model.modules() if isinstance(m, BottleneckAdapter)]
    theirs = [m.scaling.grad for m in twin.modules() if isinstance(m, PlainAdapterLinear)]
    assert len(ours) == 6 and all(g is not None and g.shape == (1,) for g in ours)
    assert_close(torch.stack(ours), torch.stack(theirs), torch.float32, "d_scaling")


def test_triton_backend_on_a_model(device):
    # The interpreter on the CPU; the compiled kernels under FASTADAPTERS_TEST_DEVICE=cuda.
    reasons = fastadapters.ops.bottleneck.BACKENDS["triton"].reasons(device=device)
    if reasons:
        pytest.skip(f"triton cannot run here: {reasons}")
    base = tiny_model("gpt2").to(device)
    model, twin = patched_and_twin(base, fastadapters.BottleneckConfig(bottleneck_size=8, scaling="learned"))
    ids = inputs(batch=1, seq=5).to(device)
    with use_backend("triton"):
        logits, loss = logits_and_loss(model, ids)
        loss.backward()
    plain_logits, plain_loss = logits_and_loss(twin, ids)
    plain_loss.backward()
    assert_close(logits, plain_logits, torch.float32, "logits")
    ours = [m.adapter_down.weight.grad for m in model.modules() if isinstance(m, BottleneckAdapter)]
    theirs = [m.down.grad for m in twin.modules() if isinstance(m, PlainAdapterLinear)]
    for a, b in zip(ours, theirs):
        assert_close(a, b, torch.float32, "d_down")


def test_bf16_model_keeps_fp32_adapter():
    base = tiny_model("llama", dtype=torch.bfloat16)
    model = fastadapters.apply(
        base, fastadapters.BottleneckConfig(bottleneck_size=8, use_parallel_adapter=True)
    )
    params = dict(adapter_named_parameters(model))
    assert params and all(p.dtype == torch.float32 for p in params.values())
    logits, loss = logits_and_loss(model, inputs())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in params.values())


def test_dropout_only_in_training():
    model = fastadapters.apply(
        tiny_model("llama"), fastadapters.BottleneckConfig(bottleneck_size=8, adapter_dropout=0.5)
    )
    randomize_adapter(model)
    ids = inputs()
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
        model.train()
        torch.manual_seed(0)
        c = model(ids).logits
        torch.manual_seed(0)
        d = model(ids).logits
        e = model(ids).logits
    assert torch.equal(a, b) and torch.equal(c, d) and not torch.allclose(a, c) and not torch.equal(d, e)


def test_init_weights():
    bert = fastadapters.apply(tiny_model("llama"), fastadapters.BottleneckConfig(bottleneck_size=16))
    mam = fastadapters.apply(
        tiny_model("llama"), fastadapters.BottleneckConfig(bottleneck_size=16, init_weights="mam_adapter")
    )
    for m in bert.modules():
        if isinstance(m, BottleneckAdapter):
            for w in (m.adapter_down.weight, m.adapter_up.weight):
                assert abs(w.std().item() - 0.02) < 0.006 and abs(w.mean().item()) < 0.006
    for m in mam.modules():
        if isinstance(m, BottleneckAdapter):
            assert torch.all(m.adapter_up.weight == 0) and m.adapter_down.weight.abs().max() > 0
    # mam_adapter starts as the identity: the patched model equals the base model.
    base = tiny_model("llama")
    ids = inputs()
    assert torch.equal(mam(ids).logits, base(ids).logits)


# --------------------------------------------------------------------------------------------- save / load


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(non_linearity="relu"),
        dict(
            use_parallel_adapter=True, scaling="learned", non_linearity="silu", target_modules=["fc1", "fc2"]
        ),
        dict(use_adapterp=True, scaling=2.0),
    ],
    ids=["adapterh", "parallel-learned", "adapterp"],
)
def test_save_load_roundtrip(tmp_path, kwargs):
    config = fastadapters.BottleneckConfig(bottleneck_size=8, **kwargs)
    model = fastadapters.apply(tiny_model("opt"), config)
    randomize_adapter(model, seed=5)
    ids = inputs()
    with torch.no_grad():
        expected = model(ids).logits
    fastadapters.save(model, str(tmp_path))
    fresh = tiny_model("opt")
    with torch.no_grad():
        base_logits = fresh(ids).logits
    fastadapters.load(fresh, str(tmp_path))
    # The saved config also says where each adapter sat (names relative to the decoder layer).
    placed = {
        n.split(".", 4)[-1]: m.placement for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)
    }
    assert fresh.fastadapters_config.placements == placed
    assert dataclasses.replace(fresh.fastadapters_config, placements=None) == config
    assert fastadapters.trainable_parameters(fresh) == fastadapters.trainable_parameters(model)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, expected)
    fastadapters.remove(fresh)
    assert not any(isinstance(m, BottleneckAdapter) for m in fresh.modules())
    assert all(p.requires_grad for p in fresh.parameters())
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, base_logits)


# --------------------------------------------------------------------------------------------- HF Trainer


@pytest.mark.parametrize("mode", ["adapterh", "parallel"])
def test_trainer_lowers_loss(tmp_path, mode):
    config = fastadapters.BottleneckConfig(
        bottleneck_size=16, scaling="learned", init_weights="mam_adapter", **MODES[mode]
    )
    model = fastadapters.apply(tiny_model("llama"), config)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # Adam moves each weight by about lr per step; a random tiny model passes little of the MLP's signal to
    # the logits, so the adapter needs the larger step.
    before, after = trainer_loss_before_after(model, tmp_path, learning_rate=5e-2)
    assert after < before - 0.1, f"loss did not fall: {before:.4f} -> {after:.4f}"
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bottleneck_size=0), "bottleneck_size must be an integer >= 1"),
        (dict(bottleneck_size=2.5), "bottleneck_size must be an integer >= 1"),
        (dict(non_linearity="swish"), "non_linearity must be one of"),
        (dict(use_parallel_adapter=True, use_adapterp=True), "exclusive"),
        (dict(scaling="fixed"), "scaling must be a finite number or 'learned'"),
        (dict(scaling=float("inf")), "scaling must be a finite number or 'learned'"),
        (dict(adapter_dropout=1.0), "adapter_dropout must be in"),
        (dict(init_weights="xavier"), "init_weights must be"),
        (dict(target_modules=[]), "target_modules must be None or a non-empty list"),
        (dict(target_modules=5), "target_modules must be None or a non-empty list"),
        (dict(bottleneck_size=True), "bottleneck_size must be an integer >= 1"),
        (dict(adapter_dropout="0.1"), r"adapter_dropout must be in \[0, 1\), got '0.1' \(str\)"),
        (dict(use_parallel_adapter="false"), "use_parallel_adapter must be True or False"),
        (dict(non_linearity=["relu"]), "non_linearity must be one of"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fastadapters.BottleneckConfig(**kwargs)


@pytest.mark.parametrize(
    "family, kwargs, message",
    [
        ("llama", dict(target_modules=["q_proj"]), "neither of the mh nor of the output kind"),
        ("llama", dict(target_modules=["down_proj", "o_proj"]), "neither of the mh nor of the output kind"),
        ("gpt2", dict(target_modules=["c_proj"]), r"'transformer.h.0.attn.c_proj' is neither"),
        ("llama", dict(target_modules=["no_such_proj"]), "match no module"),
        ("llama", dict(use_parallel_adapter=True, target_modules=["rotary_emb"]), "expected one of"),
    ],
    ids=["attention-target", "one-bad-of-two", "gpt2-attn-c_proj", "missing", "not-linear"],
)
def test_bad_target_leaves_model_untouched(family, kwargs, message):
    model = tiny_model(family)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=message):
        fastadapters.apply(model, fastadapters.BottleneckConfig(bottleneck_size=4, **kwargs))
    assert_same(model, snap)


def test_apply_twice_refused_and_remove_restores():
    model = tiny_model("bloom")
    snap = snapshot(model)
    fastadapters.apply(model, fastadapters.BottleneckConfig(bottleneck_size=4))
    with pytest.raises(ValueError, match="already has a fastadapters adapter"):
        fastadapters.apply(model, fastadapters.BottleneckConfig(bottleneck_size=4, use_parallel_adapter=True))
    with pytest.raises(ValueError, match="merge/unmerge apply to LoRA"):
        fastadapters.merge(model)
    fastadapters.remove(model)
    assert_same(model, snap)
