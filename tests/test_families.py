"""fastadapters.families and the one state-dict schema (patch.expected_state / check_state).

The schema equals what `apply` really adds, on every family and adapter type, bare or already adapted; a
wrong shape, a missing key, an extra key or a non-float tensor is refused with a message naming the key;
io.load and AdapterBank give the same verdict on the same bad file.
"""

import copy
import re

import pytest
import torch
from models import FAMILIES, tiny_model
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import fastadapters
from fastadapters import families, layers, patch
from fastadapters.bank import AdapterBank
from fastadapters.io import WEIGHTS_NAME, adapter_state_dict
from fastadapters.patch import check_state, expected_state
from fastadapters.structure import read_structure

CONFIGS = {
    "lora": lambda: fastadapters.LoraConfig(r=3),
    "adapterh": lambda: fastadapters.BottleneckConfig(bottleneck_size=4),
    "adapterp-learned": lambda: fastadapters.BottleneckConfig(
        bottleneck_size=5, use_adapterp=True, scaling="learned"
    ),
    "parallel": lambda: fastadapters.BottleneckConfig(bottleneck_size=4, use_parallel_adapter=True),
    "prefix": lambda: fastadapters.PrefixConfig(num_virtual_tokens=3),
    "prefix-projection": lambda: fastadapters.PrefixConfig(
        num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=8
    ),
    "prompt": lambda: fastadapters.PromptTuningConfig(num_virtual_tokens=3),
    "p-tuning-lstm": lambda: fastadapters.PTuningConfig(
        num_virtual_tokens=3, encoder="lstm", encoder_hidden_size=8
    ),
}


def shapes(model) -> dict:
    return {name: tuple(p.shape) for name, p in patch.adapter_named_parameters(model)}


@pytest.mark.parametrize("family", FAMILIES)
def test_expected_state_is_what_apply_adds(family):
    base = tiny_model(family)
    for kind, make in CONFIGS.items():
        config = make()
        expected = expected_state(base, config)
        model = fastadapters.apply(copy.deepcopy(base), config)
        assert expected == shapes(model) and expected, f"{family} {kind}"
        # The adapted model's structure gives the same schema (its layers are read through the wrappers).
        assert expected_state(model, config) == expected, f"{family} {kind} (adapted)"


def test_expected_state_refuses_what_apply_refuses():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="match no module"):
        expected_state(model, fastadapters.LoraConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match="neither of the mh nor of the output kind"):
        expected_state(model, fastadapters.BottleneckConfig(target_modules=["q_proj"]))
    with pytest.raises(TypeError, match="config must be one of"):
        expected_state(model, object())


def _good_state(family: str, kind: str):
    base = tiny_model(family)
    config = CONFIGS[kind]()
    state = adapter_state_dict(fastadapters.apply(copy.deepcopy(base), config))
    return base, config, state


def _break(state: dict, how: str) -> tuple[dict, str]:
    """A broken copy of `state` and the key its error must name."""
    state = dict(state)
    key = sorted(state)[-1]
    if how == "shape":
        state[key] = torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
    elif how == "missing":
        del state[key]
    elif how == "extra":
        key = key + "_extra"
        state[key] = torch.zeros(2)
    else:  # not a float tensor
        state[key] = torch.zeros(state[key].shape, dtype=torch.int64)
    return state, key


BREAKS = ("shape", "missing", "extra", "integer")
SCHEMA_KINDS = ("lora", "adapterp-learned", "parallel", "prefix", "prefix-projection")


@pytest.mark.parametrize("kind", SCHEMA_KINDS)
@pytest.mark.parametrize("how", BREAKS)
def test_check_state_names_the_key(kind, how):
    base, config, state = _good_state("llama", kind)
    assert check_state(base, config, state, "adapter 'a'") == expected_state(base, config)
    bad, key = _break(state, how)
    with pytest.raises(ValueError) as info:
        check_state(base, config, bad, "adapter 'a'")
    message = str(info.value)
    assert message.startswith("adapter 'a': ") and key in message, message
    if how == "shape":
        want = tuple(state[key].shape)
        assert f"has shape {tuple(bad[key].shape)}, this model needs {want}" in message, message
    if how in ("missing", "extra"):
        assert ("missing" if how == "missing" else "unexpected") + f" ['{key}'" in message, message


@pytest.mark.parametrize("kind", ("lora", "adapterp-learned", "prefix", "prefix-projection"))
@pytest.mark.parametrize("how", BREAKS)
def test_bank_and_io_load_give_the_same_verdict(kind, how, tmp_path):
    base, config, state = _good_state("llama", kind)
    folder = tmp_path / "adapter"
    fastadapters.save(fastadapters.apply(copy.deepcopy(base), config), str(folder))
    bad, key = _break(state, how)
    save_file({k: v.contiguous() for k, v in bad.items()}, str(folder / WEIGHTS_NAME))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError) as by_io:
        fastadapters.load(model, str(folder))
    assert getattr(model, "fastadapters_config", None) is None
    bank = AdapterBank(copy.deepcopy(base))
    with pytest.raises(ValueError) as by_bank:
        bank.load("a", str(folder))
    assert bank.names() == []
    # The same finding, after each caller's own opening words.
    strip = lambda e: re.sub(r"^.*?: ", "", str(e.value), count=1)
    assert strip(by_io) == strip(by_bank) and key in strip(by_io), (str(by_io.value), str(by_bank.value))
    # The unbroken state passes both.
    save_file(state, str(folder / WEIGHTS_NAME))
    fastadapters.load(copy.deepcopy(base), str(folder))
    bank.load("a", str(folder))
    assert bank.names() == ["a"]


# --------------------------------------------------------------------------------------------- families


def test_old_names_stay_importable():
    names = ["LORA_TARGETS", "BOTTLENECK_KINDS", "BOTTLENECK_PLACEMENTS"]
    names += ["ADAPTERH_TARGETS", "ADAPTERP_TARGETS", "PARALLEL_TARGETS", "PREFIX_ATTENTION", "LINEAR_TYPES"]
    names += ["model_type", "bottleneck_placement", "find_targets", "resolve_targets", "matches"]
    for name in names:
        assert getattr(patch, name) is getattr(families, name), name
    assert layers.linear_shape is families.linear_shape
    assert layers.BottleneckAdapter.KINDS == families.PLACEMENTS


# The tables the eight original families had before placement was read from the model: the structure
# must give exactly these (targets as leaf names or dotted suffixes, groups as leaf names).
_LLAMA = ("llama", "mistral", "qwen2")
_QKV = ("q_proj", "k_proj", "v_proj")
_FUSED = {"bloom": ("query_key_value",), "gpt_neox": ("query_key_value",), "gpt2": ("c_attn",)}
OLD_LORA = {**dict.fromkeys((*_LLAMA, "opt", "gptj"), ("q_proj", "v_proj")), **_FUSED}
OLD_GROUPS = {**dict.fromkeys(_LLAMA, (_QKV, ("gate_proj", "up_proj"))), "opt": (_QKV,), "gptj": (_QKV,)}
OLD_PLACEMENTS = {
    **dict.fromkeys(_LLAMA, {"gate_proj": "mh", "up_proj": "mh", "down_proj": "output"}),
    "bloom": {"dense_h_to_4h": "mh", "dense_4h_to_h": "output"},
    "gpt_neox": {"dense_h_to_4h": "mh", "dense_4h_to_h": "output"},
    "gptj": {"fc_in": "mh", "fc_out": "output"},
    "opt": {"fc1": "mh", "fc2": "output"},
    "gpt2": {"mlp.c_fc": "mh", "mlp.c_proj": "output"},
}
OLD_PARALLEL = {**dict.fromkeys((*_LLAMA, "opt", "gptj"), _QKV), **_FUSED}
OLD_PREFIX = {
    **dict.fromkeys((*_LLAMA, "opt"), ("self_attn", "registry")),
    "gptj": ("attn", "registry"),
    "gpt2": ("attn", "registry"),
    "gpt_neox": ("attention", "registry"),
    "bloom": ("self_attention", "bloom"),
}


def _expand(model, table: dict) -> dict:
    """full module name -> value for every module matching a key of `table` (name or dotted suffix)."""
    return {n: v for n, _ in model.named_modules() for k, v in table.items() if families.matches(n, k)}


@pytest.mark.parametrize("family", FAMILIES)
def test_structure_gives_the_original_tables(family):
    model = tiny_model(family)
    lora = sorted(families.lora_targets(model, fastadapters.LoraConfig()))
    assert lora == sorted(_expand(model, dict.fromkeys(OLD_LORA[family], 1)))
    series = families.bottleneck_placement(model, fastadapters.BottleneckConfig())
    assert {n: p for n, (_, p) in series.items()} == _expand(model, OLD_PLACEMENTS[family])
    adapterp = families.bottleneck_placement(model, fastadapters.BottleneckConfig(use_adapterp=True))
    assert {n: p for n, (_, p) in adapterp.items()} == {
        n: p for n, p in _expand(model, OLD_PLACEMENTS[family]).items() if p == "output"
    }
    parallel = families.bottleneck_placement(model, fastadapters.BottleneckConfig(use_parallel_adapter=True))
    assert sorted(parallel) == sorted(_expand(model, dict.fromkeys(OLD_PARALLEL[family], 1)))
    paths, route = families.attention_paths(model)
    suffix, old_route = OLD_PREFIX[family]
    assert (paths, route) == ([n for n, _ in model.named_modules() if families.matches(n, suffix)], old_route)
    # Every old group is (within) a traced group of the same layer; GPT-J's fc_in reads q/k/v's input too.
    groups = families.shared_input_groups(model)
    for old in OLD_GROUPS.get(family, ()):
        for layer in read_structure(model).layers:
            names = {f"{layer}.{p}" for p in ("self_attn", "attn", "mlp")}
            wanted = {f"{parent}.{leaf}" for parent in names for leaf in old} & set(
                dict(model.named_modules())
            )
            assert any(wanted <= set(g) for g in groups), (family, old, groups)
    extra = {n.rpartition(".")[2] for g in groups for n in g} - {
        leaf for g in OLD_GROUPS.get(family, ()) for leaf in g
    }
    assert extra == ({"fc_in"} if family == "gptj" else set()), extra


def test_layer_shapes_and_placements():
    linear, conv = nn.Linear(5, 7), Conv1D(7, 5)  # both map 5 features to 7
    for layer in (linear, conv):
        assert families.linear_shape(layer) == (5, 7)
        assert families.base_weight(layer).shape == (7, 5)
    assert families.base_weight(conv).data_ptr() == conv.weight.data_ptr()
    got = {p: families.placement_shape(p, 5, 7) for p in families.PLACEMENTS}
    assert got == {"mh": (5, 5), "output": (7, 7), "parallel": (5, 7)}
    with pytest.raises(ValueError, match="placement must be one of"):
        families.placement_shape("input", 5, 7)
    assert families.model_type(tiny_model("gpt2")) == "gpt2" and families.model_type(linear) is None
