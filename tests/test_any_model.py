"""Placement read from the model on families with no table: the fixed `make test` subset of the sweep.

Every adapter kind on tiny Qwen3, Gemma2, Phi-3, Falcon and Mixtral (tests/any_model.py builds them from
their config classes and runs the checks: apply, forward, backward, generate, remove restores the exact
base, LoRA equals PEFT, prefix generation with and without the KV cache). What a model cannot take is
refused with an error naming the reason. The full sweep over every causal LM is scripts/model_sweep.py.
"""

import copy
import functools

import any_model
import pytest
import torch
from torch import nn

import fastadapters
from fastadapters import families
from fastadapters.layers import BottleneckAdapter, LoraLinear

SUBSET = ("qwen3", "gemma2", "phi3", "falcon", "mixtral")
# (model type, kind) -> words the refusal must contain.
REFUSED = {
    ("gemma2", "prefix"): ["soft-capping", "attn_logit_softcapping"],
    ("falcon", "prefix"): ["attention interface", "FalconAttention", "computes attention itself"],
    ("mixtral", "series"): ["MLP", "use_parallel_adapter=True"],
}


@functools.cache
def tiny(model_type: str) -> nn.Module:
    model, why = any_model.build(model_type)
    assert model is not None, why
    return model


@pytest.mark.parametrize("kind", any_model.KINDS)
@pytest.mark.parametrize("model_type", SUBSET)
def test_every_kind(model_type, kind):
    result = any_model.check(tiny(model_type), kind)
    words = REFUSED.get((model_type, kind))
    if words is None:
        assert result["ok"], (result["error"], result.get("trace"))
        expected = {"apply", "forward", "backward", "generate", "remove_restores"}
        expected |= {"equals_peft"} if kind.startswith("lora") else set()
        expected |= {"cache_equals_no_cache"} if kind == "prefix" else set()
        assert set(result["checks"]) == expected
    else:
        assert not result["ok"] and result["error"].startswith("ValueError"), result
        for word in words:
            assert word in result["error"], (word, result["error"])


@pytest.mark.parametrize("model_type", ("qwen3", "gemma2", "mixtral"))
def test_default_lora_shares_the_shrink(model_type):
    """q and v read one input: found by the traced forward, their LoRAs get one group (the grouped op)."""
    model = fastadapters.apply(copy.deepcopy(tiny(model_type)), fastadapters.LoraConfig(r=2))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    assert sorted(n.rsplit(".", 1)[1] for n in layers) == ["q_proj", "q_proj", "v_proj", "v_proj"]
    for name, layer in layers.items():
        assert layer.group is not None and {id(m) for m in layer.group.members} == {
            id(m) for n, m in layers.items() if n.rsplit(".", 1)[0] == name.rsplit(".", 1)[0]
        }


def test_fused_projections_are_targets_as_in_peft():
    """Phi-3's fused qkv_proj is its LoRA default (query and value roles) and its parallel-adapter target;
    its fused gate_up_proj is an MLP input (mh), down_proj the output."""
    model = tiny("phi3")
    lora = families.lora_targets(model, fastadapters.LoraConfig())
    assert sorted(lora) == [f"model.layers.{i}.self_attn.qkv_proj" for i in range(2)]
    series = families.bottleneck_placement(model, fastadapters.BottleneckConfig())
    assert {n.split(".", 3)[-1]: p for n, (_, p) in series.items()} == {
        "mlp.gate_up_proj": "mh",
        "mlp.down_proj": "output",
    }


@pytest.mark.parametrize("model_type", ("phi3", "falcon"))
def test_saved_placements_load_the_same_way(model_type, tmp_path):
    base = tiny(model_type)
    model = fastadapters.apply(copy.deepcopy(base), fastadapters.BottleneckConfig(bottleneck_size=4))
    ids = any_model.ids_batch()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    fastadapters.save(model, str(tmp_path))
    fresh = fastadapters.load(copy.deepcopy(base), str(tmp_path))
    placed = {n: m.placement for n, m in fresh.modules_and_names()} if False else None  # noqa: F841
    placements = fresh.fastadapters_config.placements
    assert placements and set(placements.values()) == {"mh", "output"}
    assert {n: m.placement for n, m in fresh.named_modules() if isinstance(m, BottleneckAdapter)} == {
        n: m.placement for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)
    }
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, expected)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.out(torch.tanh(self.mix(x)))


class _Custom(nn.Module):
    """A model of no known structure: repeated blocks without an attention or MLP module."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


@pytest.mark.parametrize(
    "config, words",
    [
        (fastadapters.LoraConfig(), ["no attention block", "_Custom", "'mix'", "'out'", "target_modules"]),
        (fastadapters.BottleneckConfig(), ["MLP", "'mix'", "placements"]),
        (fastadapters.BottleneckConfig(use_parallel_adapter=True), ["no attention block", "target_modules"]),
        (fastadapters.PrefixConfig(), ["no attention block", "attention interface"]),
    ],
    ids=["lora", "series", "parallel", "prefix"],
)
def test_unreadable_structure_names_what_to_pass(config, words):
    model = _Custom()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        fastadapters.apply(model, config)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # What the error asks for works.
    explicit = (
        fastadapters.BottleneckConfig(
            target_modules=["mix", "out"], placements={"mix": "mh", "out": "output"}
        )
        if isinstance(config, fastadapters.BottleneckConfig) and not config.use_parallel_adapter
        else fastadapters.LoraConfig(target_modules=["mix"])
    )
    if not isinstance(config, fastadapters.PrefixConfig):
        fastadapters.apply(model, explicit)
        assert model(torch.randn(2, 8)).shape == (2, 3)


def test_all_linear_is_every_linear_but_the_head():
    model = tiny("qwen3")
    config = fastadapters.LoraConfig(target_modules="all-linear")
    targets = families.lora_targets(model, config)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(targets) == linears - {"lm_head"} and len(targets) == 14


def test_placements_config_is_checked():
    with pytest.raises(ValueError, match="placements must be"):
        fastadapters.BottleneckConfig(placements={"up_proj": "parallel"})
    with pytest.raises(ValueError, match="placements must be"):
        fastadapters.BottleneckConfig(use_parallel_adapter=True, placements={"up_proj": "mh"})
