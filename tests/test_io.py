"""Adapter files: fastadapters' format and PEFT's, key layouts, and every way a file can be bad (missing,
truncated, corrupted, not matching its config or its base model): a clear error, the model untouched."""

import copy
import json
import os

import peft
import pytest
import torch
from models import tiny_model
from safetensors.torch import load_file, save_file
from test_lora_models import all_linear_targets, assert_same, assert_untouched, inputs, make_pair, snapshot

import fastadapters
from fastadapters.io import CONFIG_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, WEIGHTS_NAME


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A llama adapter (q/k/v/o/gate/up/down) saved in both formats, by us and by peft."""
    root = tmp_path_factory.mktemp("adapters")
    base, ours, theirs = make_pair("llama", targets=all_linear_targets(tiny_model("llama")))
    fastadapters.save(ours, root / "fa")
    fastadapters.save_peft(ours, root / "ours_peft")
    theirs.save_pretrained(root / "peft")
    return base, ours, root


def test_fastadapters_format(saved):
    _, ours, root = saved
    assert sorted(os.listdir(root / "fa")) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    meta = json.loads((root / "fa" / CONFIG_NAME).read_text())
    assert meta["config"]["r"] == ours.fastadapters_config.r
    assert meta["config"]["adapter_type"] == "lora"
    assert meta["base_model"]["model_type"] == "llama" and meta["base_model"]["hidden_size"] == 64
    state = load_file(root / "fa" / WEIGHTS_NAME)
    expected = {n: p for n, p in fastadapters.patch.adapter_named_parameters(ours)}
    assert set(state) == set(expected)
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in state
    for k, v in expected.items():
        assert torch.equal(state[k], v.detach())


def test_save_peft_matches_peft_layout(saved):
    """Our PEFT export has exactly the keys, shapes and config fields peft's own save_pretrained writes."""
    _, _, root = saved
    ours = load_file(root / "ours_peft" / PEFT_WEIGHTS_NAME)
    theirs = load_file(root / "peft" / PEFT_WEIGHTS_NAME)
    assert set(ours) == set(theirs)
    for k in theirs:
        assert torch.equal(ours[k], theirs[k]), k
    our_cfg = json.loads((root / "ours_peft" / PEFT_CONFIG_NAME).read_text())
    their_cfg = json.loads((root / "peft" / PEFT_CONFIG_NAME).read_text())
    for key in ("peft_type", "r", "lora_alpha", "lora_dropout", "fan_in_fan_out", "use_rslora", "use_dora"):
        assert our_cfg[key] == their_cfg[key], key
    assert sorted(our_cfg["target_modules"]) == sorted(their_cfg["target_modules"])
    # peft can read our config file as its own LoraConfig.
    cfg = peft.PeftConfig.from_pretrained(root / "ours_peft")
    assert cfg.r == our_cfg["r"]


def test_load_into_model_with_adapter_refused(saved):
    base, _, root = saved
    model = fastadapters.apply(copy.deepcopy(base), fastadapters.LoraConfig(r=2))
    before = snapshot(model)
    for loader, folder in ((fastadapters.load, "fa"), (fastadapters.load_peft, "peft")):
        with pytest.raises(ValueError, match="already has"):
            loader(model, root / folder)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def _copy_folder(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt(path):
    gen = torch.Generator().manual_seed(0)
    path.write_bytes(
        bytes(torch.randint(0, 256, (path.stat().st_size,), generator=gen, dtype=torch.uint8).tolist())
    )


def _header_lies(path):
    """A valid-looking header whose offsets run past the end of the data."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 10_000
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])


def _edit_json(path, **changes):
    cfg = json.loads(path.read_text())
    target = cfg["config"] if "config" in cfg else cfg
    target.update(changes)
    path.write_text(json.dumps(cfg))


def _write_json(path, data):
    path.write_text(json.dumps(data))


def _edit_top(path, drop=(), **changes):
    """Edits the config file's top level (fastadapters' meta entries, or PEFT's fields)."""
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    for key in drop:
        del cfg[key]
    path.write_text(json.dumps(cfg))


def _poison(path, value=float("nan")):
    """Writes `value` into one element of the second tensor (in sorted key order) of a weights file."""
    state = load_file(path)
    key = sorted(state)[1]
    state[key].view(-1)[3] = value
    save_file(state, path)
    return key


# (folder, loader, how to break the copy, error, words the message must contain)
BAD_FILES = {
    "fa-missing-weights": (
        "fa",
        "load",
        lambda d: (d / WEIGHTS_NAME).unlink(),
        FileNotFoundError,
        [WEIGHTS_NAME],
    ),
    "fa-missing-config": (
        "fa",
        "load",
        lambda d: (d / CONFIG_NAME).unlink(),
        FileNotFoundError,
        [CONFIG_NAME],
    ),
    "fa-truncated": (
        "fa",
        "load",
        lambda d: _truncate(d / WEIGHTS_NAME),
        ValueError,
        ["truncated", WEIGHTS_NAME],
    ),
    "fa-corrupted": (
        "fa",
        "load",
        lambda d: _corrupt(d / WEIGHTS_NAME),
        ValueError,
        ["corrupted", WEIGHTS_NAME],
    ),
    "fa-header-lies": ("fa", "load", lambda d: _header_lies(d / WEIGHTS_NAME), ValueError, [WEIGHTS_NAME]),
    "fa-bad-json": ("fa", "load", lambda d: (d / CONFIG_NAME).write_text("{r: 4"), ValueError, ["JSON"]),
    "fa-config-r": (
        "fa",
        "load",
        lambda d: _edit_json(d / CONFIG_NAME, r=8),
        ValueError,
        ["shape", "lora_A"],
    ),
    "fa-config-rank0": ("fa", "load", lambda d: _edit_json(d / CONFIG_NAME, r=0), ValueError, ["r "]),
    "fa-config-targets": (
        "fa",
        "load",
        lambda d: _edit_json(d / CONFIG_NAME, target_modules=["q_proj"]),
        ValueError,
        ["do not match its config", "unexpected", "down_proj"],
    ),
    "fa-config-type": (
        "fa",
        "load",
        lambda d: _edit_json(d / CONFIG_NAME, adapter_type="ia3"),
        ValueError,
        ["ia3"],
    ),
    "peft-missing-weights": (
        "peft",
        "load_peft",
        lambda d: (d / PEFT_WEIGHTS_NAME).unlink(),
        FileNotFoundError,
        [PEFT_WEIGHTS_NAME],
    ),
    "peft-truncated": (
        "peft",
        "load_peft",
        lambda d: _truncate(d / PEFT_WEIGHTS_NAME),
        ValueError,
        ["truncated"],
    ),
    "peft-corrupted": (
        "peft",
        "load_peft",
        lambda d: _corrupt(d / PEFT_WEIGHTS_NAME),
        ValueError,
        ["corrupted"],
    ),
    "peft-config-r": (
        "peft",
        "load_peft",
        lambda d: _edit_json(d / PEFT_CONFIG_NAME, r=2),
        ValueError,
        ["shape"],
    ),
    "peft-type": (
        "peft",
        "load_peft",
        lambda d: _edit_json(d / PEFT_CONFIG_NAME, peft_type="IA3"),
        ValueError,
        ["IA3"],
    ),
    "peft-dora": (
        "peft",
        "load_peft",
        lambda d: _edit_json(d / PEFT_CONFIG_NAME, use_dora=True),
        ValueError,
        ["dora"],
    ),
    # Config fields of the wrong type: one clear error naming the file, the field and what was expected.
    "fa-rslora-string": (
        "fa",
        "load",
        lambda d: _edit_json(d / CONFIG_NAME, use_rslora="false"),
        ValueError,
        [CONFIG_NAME, "use_rslora", "True or False", "'false'"],
    ),
    "fa-targets-int": (
        "fa",
        "load",
        lambda d: _edit_json(d / CONFIG_NAME, target_modules=5),
        ValueError,
        [CONFIG_NAME, "target_modules", "list of module names"],
    ),
    "fa-base-model-list": (
        "fa",
        "load",
        lambda d: _edit_top(d / CONFIG_NAME, base_model=["llama", 64]),
        ValueError,
        [CONFIG_NAME, "base_model", "model_type"],
    ),
    "fa-config-list": (
        "fa",
        "load",
        lambda d: _write_json(d / CONFIG_NAME, [1, 2]),
        ValueError,
        [CONFIG_NAME, "JSON object", "list"],
    ),
    "peft-no-r": (
        "peft",
        "load_peft",
        lambda d: _edit_top(d / PEFT_CONFIG_NAME, drop=["r"]),
        ValueError,
        [PEFT_CONFIG_NAME, "'r'"],
    ),
    "peft-config-list": (
        "peft",
        "load_peft",
        lambda d: _write_json(d / PEFT_CONFIG_NAME, [{"r": 4}]),
        ValueError,
        [PEFT_CONFIG_NAME, "JSON object", "list"],
    ),
    "peft-r-string": (
        "peft",
        "load_peft",
        lambda d: _edit_json(d / PEFT_CONFIG_NAME, r="abc"),
        ValueError,
        [PEFT_CONFIG_NAME, "r (the LoRA rank)", "integer", "'abc'"],
    ),
    "peft-dropout-string": (
        "peft",
        "load_peft",
        lambda d: _edit_json(d / PEFT_CONFIG_NAME, lora_dropout="x"),
        ValueError,
        [PEFT_CONFIG_NAME, "lora_dropout", "[0, 1)", "'x'"],
    ),
    "peft-rslora-string": (
        "peft",
        "load_peft",
        lambda d: _edit_json(d / PEFT_CONFIG_NAME, use_rslora="false"),
        ValueError,
        [PEFT_CONFIG_NAME, "use_rslora", "True or False"],
    ),
    "peft-targets-int": (
        "peft",
        "load_peft",
        lambda d: _edit_json(d / PEFT_CONFIG_NAME, target_modules=5),
        ValueError,
        [PEFT_CONFIG_NAME, "target_modules", "list of module names"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_adapter_files(case, saved, tmp_path):
    base, _, root = saved
    folder, loader, breaker, error, words = BAD_FILES[case]
    bad = _copy_folder(root / folder, tmp_path / "bad")
    breaker(bad)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(error) as info:
        getattr(fastadapters, loader)(model, bad)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"
    assert_untouched(model, before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("loader, value", [("load", float("nan")), ("load_peft", float("-inf"))])
def test_nonfinite_weights_are_named(loader, value, saved, tmp_path):
    """NaN or inf in an adapter file is refused, naming the tensor (PEFT's key for load_peft)."""
    base, _, root = saved
    folder, weights = ("fa", WEIGHTS_NAME) if loader == "load" else ("peft", PEFT_WEIGHTS_NAME)
    bad = _copy_folder(root / folder, tmp_path / "bad")
    key = _poison(bad / weights, value)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN or inf in 1 tensor") as info:
        getattr(fastadapters, loader)(model, bad)
    assert key.removeprefix("base_model.model.").replace(".default.", ".") in str(info.value)
    assert_untouched(model, before)


@pytest.mark.parametrize("loader", ["load", "load_peft"])
@pytest.mark.parametrize("unreadable", ["config", "weights"])
def test_unreadable_file_says_so(loader, unreadable, saved, tmp_path, monkeypatch):
    """A file that cannot be opened (permissions) raises PermissionError naming it, not 'corrupted'."""
    base, _, root = saved
    folder = "fa" if loader == "load" else "peft"
    bad = _copy_folder(root / folder, tmp_path / "bad")
    names = {"load": (CONFIG_NAME, WEIGHTS_NAME), "load_peft": (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)}[loader]
    path = bad / names[unreadable == "weights"]
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: deny the open the way the OS would for anyone else
        real_open = open

        def denying_open(file, *args, **kwargs):
            if os.fspath(file) == os.fspath(path):
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(fastadapters.io, "open", denying_open, raising=False)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(PermissionError) as info:
        getattr(fastadapters, loader)(model, bad)
    message = str(info.value)
    assert "cannot be read" in message and "Permission denied" in message and str(path) in message
    assert "corrupted" not in message
    assert_untouched(model, before)


@pytest.mark.parametrize("loader", ["load", "load_peft"])
def test_missing_directory(loader, saved, tmp_path):
    base, _, _ = saved
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        getattr(fastadapters, loader)(model, tmp_path / "nowhere")
    assert_untouched(model, before)


@pytest.mark.parametrize(
    "family, overrides, loader, words",
    [
        (
            "llama",
            {"hidden_size": 32, "intermediate_size": 48},
            "load",
            ["different base model", "hidden_size"],
        ),
        ("mistral", {}, "load", ["different base model", "model_type"]),
        ("gpt2", {}, "load_peft", ["target_modules", "match no module"]),
        ("llama", {"hidden_size": 32, "intermediate_size": 48}, "load_peft", ["shape"]),
        ("llama", {"num_hidden_layers": 1}, "load_peft", ["match no module", "layers.1"]),
    ],
    ids=["fa-hidden", "fa-family", "peft-family", "peft-hidden", "peft-layers"],
)
def test_adapter_for_another_base_model(family, overrides, loader, words, saved):
    _, _, root = saved
    model = tiny_model(family, **overrides)
    before = snapshot(model)
    with pytest.raises(ValueError) as info:
        getattr(fastadapters, loader)(model, root / ("fa" if loader == "load" else "peft"))
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"
    assert_untouched(model, before)


def test_loaded_adapter_is_trainable_and_resaves(saved, tmp_path):
    """load -> train step -> save -> load gives the trained weights back."""
    base, _, root = saved
    model = fastadapters.load(copy.deepcopy(base), root / "fa")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    ids = inputs()
    model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in trainable:
            p -= 0.1 * p.grad
    fastadapters.save(model, tmp_path / "again")
    again = fastadapters.load(copy.deepcopy(base), tmp_path / "again")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_weights_are_never_unpickled(saved, tmp_path):
    """A .bin (pickle) next to the config is ignored: only safetensors are read."""
    base, _, root = saved
    bad = _copy_folder(root / "peft", tmp_path / "bin")
    (bad / PEFT_WEIGHTS_NAME).rename(bad / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match=PEFT_WEIGHTS_NAME):
        fastadapters.load_peft(copy.deepcopy(base), bad)


def test_save_file_roundtrip_keeps_dtype(tmp_path):
    """A bf16 base keeps fp32 adapter weights (as peft), and they round-trip bit for bit."""
    base = tiny_model("qwen2", dtype=torch.bfloat16)
    model = fastadapters.apply(copy.deepcopy(base), fastadapters.LoraConfig(r=3))
    state = {n: p.detach().clone() for n, p in fastadapters.patch.adapter_named_parameters(model)}
    assert all(v.dtype == torch.float32 for v in state.values())
    fastadapters.save(model, tmp_path / "bf16")
    again = fastadapters.load(copy.deepcopy(base), tmp_path / "bf16")
    for n, p in fastadapters.patch.adapter_named_parameters(again):
        assert torch.equal(p, state[n]), n


def test_save_peft_ambiguous_leaf_names(tmp_path):
    """GPT-2 has attn.c_proj and mlp.c_proj: an adapter on one must not spread to the other in peft."""
    base, ours, _ = make_pair("gpt2", targets=["attn.c_proj"])
    fastadapters.save_peft(ours, tmp_path / "p")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "p", is_trainable=True)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == n_ours
    assert_same(ours, theirs, inputs(), "gpt2 attn.c_proj save_peft -> PeftModel.from_pretrained")
    again = fastadapters.load_peft(copy.deepcopy(base), tmp_path / "p")
    assert_same(again, theirs, inputs(), "gpt2 attn.c_proj save_peft -> load_peft")
