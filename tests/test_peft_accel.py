"""fastadapters.accelerate(peft_model): parity with plain PEFT, PEFT features intact, honest summary."""

import copy
import os

import peft
import pytest
import torch
from models import tiny_model
from safetensors.torch import load_file

import fastadapters
from fastadapters.peft_accel import AcceleratedLoraLinear

# (atol, rtol) for model-level parity in fp32: logits/grads of one step, and the loss curve over 20 steps
# (differences in summation order compound through AdamW updates).
PARITY = {"step": (2e-5, 2e-5), "curve": (1e-4, 1e-4), "weights": (1e-4, 1e-4)}

FAMILY_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "gate_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bloom": ["query_key_value", "dense_4h_to_h"],
}


def peft_pair(family, dropout=0.0, **lora_kwargs):
    """Two identical PEFT models (non-zero B) over identical base weights: one to accelerate, one plain."""
    config = peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=dropout, target_modules=FAMILY_TARGETS[family], **lora_kwargs
    )
    plain = peft.get_peft_model(tiny_model(family), config)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return copy.deepcopy(plain), plain


def batch(n=2, t=9):
    ids = torch.randint(3, 97, (n, t))
    return {"input_ids": ids, "labels": ids}


def close(a, b, kind, what):
    atol, rtol = PARITY[kind]
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("family", sorted(FAMILY_TARGETS))
def test_logits_and_grads_match_peft(family):
    fast, plain = peft_pair(family)
    fastadapters.accelerate(fast, verbose=False)
    assert any(isinstance(m, AcceleratedLoraLinear) for m in fast.modules())
    inputs = batch()
    out_fast, out_plain = fast(**inputs), plain(**inputs)
    close(out_fast.logits, out_plain.logits, "step", "logits")
    out_fast.loss.backward()
    out_plain.loss.backward()
    grads_plain = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    for name, p in fast.named_parameters():
        if p.requires_grad:
            close(p.grad, grads_plain[name], "step", f"grad of {name}")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_curve_and_saved_files_match_peft(family, tmp_path):
    fast, plain = peft_pair(family)
    fastadapters.accelerate(fast, verbose=False)
    curves, inputs = {}, batch(n=4, t=16)
    for label, model in (("fast", fast), ("plain", plain)):
        torch.manual_seed(1)  # the base model's own dropout draws the same masks in both runs
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(20):
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        curves[label] = torch.tensor(losses)
        model.save_pretrained(tmp_path / label)
    assert curves["plain"][-1] < curves["plain"][0]
    close(curves["fast"], curves["plain"], "curve", "loss curve")
    assert sorted(os.listdir(tmp_path / "fast")) == sorted(os.listdir(tmp_path / "plain"))
    saved = {k: load_file(tmp_path / k / "adapter_model.safetensors") for k in ("fast", "plain")}
    assert saved["fast"].keys() == saved["plain"].keys()
    for key, value in saved["plain"].items():
        assert saved["fast"][key].shape == value.shape
        close(saved["fast"][key], value, "weights", key)


def test_dropout_and_bias_are_accelerated():
    fast, plain = peft_pair("llama", dropout=0.1, lora_bias=True)
    fastadapters.accelerate(fast, verbose=False)
    assert sum(isinstance(m, AcceleratedLoraLinear) for m in fast.modules()) == 10
    fast.eval(), plain.eval()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_()
        fast.load_state_dict(plain.state_dict())
    inputs = batch()
    close(fast(**inputs).logits, plain(**inputs).logits, "step", "logits with lora_bias")
    # In training mode dropout is live: the output differs from eval but the loss still backpropagates.
    fast.train()
    loss = fast(**inputs).loss
    loss.backward()
    assert all(p.grad is not None for n, p in fast.named_parameters() if p.requires_grad)


def test_peft_features_keep_working():
    _, plain = peft_pair("llama")
    plain.add_adapter(
        "second", peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"])
    )
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B.second" in name:
                p.normal_(0, 0.1)
    plain.eval()
    fast = fastadapters.accelerate(copy.deepcopy(plain), verbose=False)
    inputs = batch(n=3)
    for adapter in ("second", "default"):
        fast.set_adapter(adapter), plain.set_adapter(adapter)
        close(fast(**inputs).logits, plain(**inputs).logits, "step", f"set_adapter({adapter})")
    with fast.disable_adapter(), plain.disable_adapter():
        close(fast(**inputs).logits, plain(**inputs).logits, "step", "disable_adapter")
    names = ["default", "second", "__base__"]
    mixed_fast = fast(input_ids=inputs["input_ids"], adapter_names=names).logits
    mixed_plain = plain(input_ids=inputs["input_ids"], adapter_names=names).logits
    close(mixed_fast, mixed_plain, "step", "adapter_names mixed batch")
    state_fast, state_plain = fast.state_dict(), plain.state_dict()
    assert state_fast.keys() == state_plain.keys()
    merged_fast = fast.merge_and_unload()(**inputs).logits
    merged_plain = plain.merge_and_unload()(**inputs).logits
    close(merged_fast, merged_plain, "step", "merge_and_unload")


def test_summary_is_honest_for_mixed_models():
    model = peft.get_peft_model(
        tiny_model("llama"),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], lora_dropout=0.0),
    )
    model.add_adapter("dora", peft.LoraConfig(r=4, target_modules=["k_proj"], use_dora=True))
    model.add_adapter("alora", peft.LoraConfig(r=4, target_modules=["o_proj"], alora_invocation_tokens=[5]))
    fastadapters.accelerate(model, verbose=False)
    summary = model.fastadapters_summary
    # 2 layers x (q_proj, v_proj, k_proj with DoRA) and the embedding accelerated; aLoRA left on PEFT.
    assert summary.startswith("fastadapters.accelerate: 7 LoRA layers accelerated, 2 left on PEFT"), summary
    assert "2: LoRA variant (ALoraLinearVariant)" in summary, summary
    assert sum(isinstance(m, AcceleratedLoraLinear) for m in model.modules()) == 6


def test_nothing_accelerated_is_said(capsys):
    model = peft.get_peft_model(tiny_model("llama"), peft.IA3Config(target_modules=["k_proj", "down_proj"]))
    fastadapters.accelerate(model)
    err = capsys.readouterr().err
    assert "0 LoRA layers accelerated, 4 left on PEFT" in err and "nothing was accelerated" in err, err


@pytest.mark.parametrize("not_a_model", [None, "model", {"lora_A": 1}])
def test_accelerate_refuses_what_is_not_a_model(not_a_model):
    with pytest.raises(TypeError, match=r"peft_model must be a torch.nn.Module .*got (NoneType|str|dict)"):
        fastadapters.accelerate(not_a_model)


def test_deaccelerate_restores_peft_classes():
    fast, plain = peft_pair("gpt2")
    fastadapters.accelerate(fast, verbose=False)
    fastadapters.deaccelerate(fast)
    assert not any(isinstance(m, AcceleratedLoraLinear) for m in fast.modules())
    assert not hasattr(fast, "fastadapters_summary")
    inputs = batch()
    close(fast(**inputs).logits, plain(**inputs).logits, "step", "after deaccelerate")


def test_trainer_callback_accelerates(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, _ = peft_pair("llama")
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(3, 97, (8, 12))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=2,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=data, callbacks=[fastadapters.AccelerateCallback()]
    )
    trainer.train()
    assert sum(isinstance(m, AcceleratedLoraLinear) for m in model.modules()) == 10
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


# ------------------------------------------------------------------------------ drop-in fixes (issue 16)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the accelerated layers' calls of the fused op."""
    from fastadapters import peft_accel

    calls = []
    real = peft_accel.ops.lora_linear

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_accel.ops, "lora_linear", counted)
    return calls


def mlp_pair(config, dtype=torch.float32, seed=0):
    """(accelerated, plain) PEFT models over one small MLP with a ReLU(inplace=True) after the LoRA layer."""
    torch.manual_seed(seed)
    base = torch.nn.Sequential(
        torch.nn.Linear(8, 12), torch.nn.ReLU(inplace=True), torch.nn.Linear(12, 12), torch.nn.Linear(12, 3)
    ).to(dtype)
    plain = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    fast = fastadapters.accelerate(copy.deepcopy(plain), verbose=False)
    return fast, plain


def grads_of(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shape", [(4, 8), (2, 5, 8)])
def test_inplace_op_after_accelerated_layer_trains(shape, fused_calls):
    fast, plain = mlp_pair(peft.LoraConfig(r=4, target_modules=["0", "2"]))
    x = torch.randn(*shape)
    fast(x).sum().backward()  # ReLU(inplace=True) right after layer "0" raised: the output was a view
    plain(x).sum().backward()
    assert len(fused_calls) == 2
    g_fast, g_plain = grads_of(fast), grads_of(plain)
    assert g_fast.keys() == g_plain.keys() and len(g_fast) == 4
    for name, g in g_plain.items():
        close(g_fast[name], g, "step", name)


def test_inplace_add_on_accelerated_output():
    fast, _ = mlp_pair(peft.LoraConfig(r=4, target_modules=["2"]))
    layer = fast.base_model.model[2]
    h = torch.randn(3, 12, requires_grad=True)
    y = layer(h)
    y += 1.0  # what PEFT's AdaLoRA does with the result of a LoRA layer under it (`result += ...`)
    y.sum().backward()
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_hooks_on_base_and_lora_modules_run(fused_calls):
    fast, plain = mlp_pair(peft.LoraConfig(r=4, target_modules=["0", "2"]))
    x = torch.randn(4, 8)
    seen = []
    for model in (fast, plain):  # registered after accelerate
        model.base_model.model[0].base_layer.register_forward_hook(lambda m, i, o: o * 2)
        model.base_model.model[2].lora_A["default"].register_forward_hook(lambda m, i, o: seen.append(1))
    close(fast(x), plain(x), "step", "hooked base layer doubles its output")
    assert len(seen) == 2, "lora_A's hook fired in both models"
    assert fused_calls == [], "both hooked layers left on PEFT's path"
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        fresh, _ = mlp_pair(peft.LoraConfig(r=4, target_modules=["0"]))
        fresh(x)
        assert fused_calls == [], "a global module hook sends every layer to PEFT's path"
    finally:
        handle.remove()
    fresh(x)
    assert len(fused_calls) == 1


def test_hooks_present_at_accelerate_are_counted():
    torch.manual_seed(0)
    model = peft.get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)),
        peft.LoraConfig(r=2, target_modules=["0", "1"]),
    )
    model.base_model.model[1].lora_B["default"].register_forward_pre_hook(lambda m, i: None)
    fastadapters.accelerate(model, verbose=False)
    assert "1 of the accelerated have forward hooks" in model.fastadapters_summary, model.fastadapters_summary


def test_layerwise_input_dtype_casting_by_hooks():
    # PEFT's own test of peft.helpers.disable_input_dtype_casting: an fp16 model whose hooks cast each
    # module's parameters to fp32 for its call only; the input stays fp32.
    from peft.helpers import disable_input_dtype_casting

    def to_fp32(module, args):
        for p in module.parameters(recurse=False):
            p.data = p.data.float()

    def to_fp16(module, args, out):
        for p in module.parameters(recurse=False):
            p.data = p.data.half()

    outs = []
    for accelerated in (True, False):
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Linear(20, 2))
        model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["0"])).to(torch.float16)
        for module in model.modules():
            if any(True for _ in module.parameters(recurse=False)):
                module.register_forward_pre_hook(to_fp32)
                module.register_forward_hook(to_fp16)
        if accelerated:
            fastadapters.accelerate(model, verbose=False)
        x = torch.randn(4, 10)
        with pytest.raises(RuntimeError, match=r"expected m.*1 and m.*2 to have the same dtype"):
            model(x)
        with disable_input_dtype_casting(model):
            outs.append(model(x))
    assert outs[0].dtype == torch.float32
    close(outs[0], outs[1], "step", "layer-wise casting")


def test_compiled_hotswap_tensor_scalings(fused_calls):
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    fast, plain = mlp_pair(peft.LoraConfig(r=4, lora_alpha=12, target_modules=["0", "2"]))
    for model in (fast, plain):
        prepare_model_for_compiled_hotswap(model, target_rank=6)
    scaling = fast.base_model.model[0].scaling["default"]
    assert isinstance(scaling, torch.Tensor) and scaling.dim() == 0
    x = torch.randn(4, 8)
    close(fast(x), plain(x), "step", "0-d tensor scalings, ranks padded to 6")
    assert len(fused_calls) == 2


def test_lora_over_loha_in_a_mixed_model_keeps_loha():
    outs = []
    for accelerated in (True, False):
        torch.manual_seed(0)
        base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))
        model = peft.get_peft_model(
            base, peft.LoHaConfig(r=4, target_modules=["0"], init_weights=False), "loha", mixed=True
        )
        model.add_adapter("lora", peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
        model.set_adapter(["loha", "lora"])
        if accelerated:
            fastadapters.accelerate(model, verbose=False)
            assert "base layer is another adapter layer (Linear)" in model.fastadapters_summary
        outs.append(model(torch.arange(16.0).view(2, 8) / 16))
        model.set_adapter(["lora"])
        outs.append(model(torch.arange(16.0).view(2, 8) / 16))
    close(outs[0], outs[2], "step", "LoRA over LoHa")
    assert (outs[0] - outs[1]).abs().max() > 1e-3, "LoHa changes the output"


def test_float64_runs_on_the_torch_backend_only():
    assert fastadapters.ops.backend_for("lora_linear", "cpu", torch.float64) == "torch"
    x, w, a, b = (torch.randn(*s, dtype=torch.float64) for s in ((3, 4), (5, 4), (2, 4), (5, 2)))
    with fastadapters.ops.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="kernels take|not built"):
            fastadapters.ops.lora_linear(x, w, None, a, b, 1.0)
    with pytest.raises(TypeError, match="x must be float32, float16, bfloat16 or float64"):
        fastadapters.ops.lora_linear(x.int(), w, None, a, b, 1.0)


def test_float64_model_matches_peft(fused_calls):
    fast, plain = peft_pair("llama")
    fastadapters.accelerate(fast.double(), verbose=False), plain.double()
    inputs = batch()
    out_fast, out_plain = fast(**inputs), plain(**inputs)
    assert out_fast.logits.dtype == torch.float64 and len(fused_calls) == 10
    close(out_fast.logits, out_plain.logits, "step", "float64 logits")
    out_fast.loss.backward(), out_plain.loss.backward()
    g_plain = grads_of(plain)
    for name, g in grads_of(fast).items():
        assert g.dtype == torch.float64
        close(g, g_plain[name], "step", name)


def test_repr_is_peft_s():
    fast, plain = peft_pair("gpt2")
    fastadapters.accelerate(fast, verbose=False)
    assert repr(fast) == repr(plain)
    assert repr(fast.base_model.model.transformer.h[0].attn.c_attn).startswith("lora.Linear(")


def test_layers_added_later_are_accelerated(fused_calls):
    fast, plain = mlp_pair(peft.LoraConfig(r=4, target_modules=["0"]))
    config = peft.LoraConfig(r=2, target_modules=["2", "3"], init_lora_weights=False)
    for model in (fast, plain):
        model.add_adapter("later", config)  # new layers "2" and "3", and "0" gains an adapter
        model.set_adapter("later")
    fast.load_state_dict(plain.state_dict())
    assert all(type(fast.base_model.model[i]) is AcceleratedLoraLinear for i in (0, 2, 3))
    x = torch.randn(4, 8)
    close(fast(x), plain(x), "step", "add_adapter after accelerate")
    assert len(fused_calls) == 2  # "2" and "3"; "0" has no "later" adapter: PEFT's forward, base only
    fastadapters.deaccelerate(fast)
    fast.add_adapter("after_deaccelerate", peft.LoraConfig(r=2, target_modules=["3"]))
    assert type(fast.base_model.model[3]) is not AcceleratedLoraLinear


def test_inject_adapter_in_model_after_accelerate(fused_calls):
    fast, plain = mlp_pair(peft.LoraConfig(r=4, target_modules=["0"]))
    config = peft.LoraConfig(r=2, target_modules=["3"], init_lora_weights=False)
    for model in (fast, plain):
        peft.inject_adapter_in_model(config, model.base_model.model, adapter_name="injected")
    fast.load_state_dict(plain.state_dict())
    assert type(fast.base_model.model[3]) is AcceleratedLoraLinear
    x = torch.randn(4, 8)
    close(fast(x), plain(x), "step", "inject_adapter_in_model after accelerate")
    assert len(fused_calls) == 1  # "3"; injecting made "injected" the active adapter, which "0" lacks


def test_load_adapter_after_accelerate(tmp_path):
    fast, plain = mlp_pair(peft.LoraConfig(r=4, target_modules=["0"]))
    other, _ = mlp_pair(peft.LoraConfig(r=3, target_modules=["2", "3"], init_lora_weights=False), seed=1)
    other.save_pretrained(tmp_path)
    for model in (fast, plain):
        model.load_adapter(tmp_path, adapter_name="loaded")
        model.set_adapter("loaded")
    assert type(fast.base_model.model[3]) is AcceleratedLoraLinear
    x = torch.randn(4, 8)
    close(fast(x), plain(x), "step", "load_adapter after accelerate")


def two_adapter_pair():
    fast, plain = mlp_pair(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2", "3"]))
    config = peft.LoraConfig(r=3, lora_alpha=9, target_modules=["0", "3"], init_lora_weights=False)
    for model in (fast, plain):
        model.add_adapter("other", config)
    fast.load_state_dict(plain.state_dict())
    return fast, plain


def test_several_active_adapters_run_fused_with_gradients(fused_calls):
    fast, plain = two_adapter_pair()
    for model in (fast, plain):
        model.base_model.set_adapter(["default", "other"])
        model.train()
    x = torch.randn(2, 3, 8)
    out_fast, out_plain = fast(x), plain(x)
    close(out_fast, out_plain, "step", "two active adapters")
    assert len(fused_calls) == 3  # "0" and "3" with both adapters, "2" with "default" alone
    out_fast.square().sum().backward(), out_plain.square().sum().backward()
    g_fast, g_plain = grads_of(fast), grads_of(plain)
    assert g_fast.keys() == g_plain.keys() and any("other" in n for n in g_fast)
    for name, g in g_plain.items():
        close(g_fast[name], g, "step", name)


def test_adapter_names_batch_runs_multi_lora_in_inference(monkeypatch):
    from fastadapters import peft_accel

    calls = []
    real = peft_accel.ops.multi_lora_linear
    monkeypatch.setattr(peft_accel.ops, "multi_lora_linear", lambda *a: calls.append(1) or real(*a))
    fast, plain = two_adapter_pair()
    fast.eval(), plain.eval()
    x = torch.randn(5, 7, 8)
    names = ["other", "__base__", "default", "other", "default"]
    with torch.no_grad():
        close(fast(x, adapter_names=names), plain(x, adapter_names=names), "step", "adapter_names batch")
    assert len(calls) == 3
    # with gradients the layer stays on PEFT's path (the multi-adapter op has no backward)
    close(fast(x, adapter_names=names), plain(x, adapter_names=names), "step", "adapter_names, grad on")
    assert len(calls) == 3


DORA_TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_fc"],
    "bloom": ["dense_4h_to_h"],
}


@pytest.mark.parametrize("family", sorted(DORA_TARGETS))
def test_dora_logits_and_grads_match_peft(family, monkeypatch):
    from fastadapters import peft_accel

    calls = []
    real = peft_accel.ops.dora_linear
    monkeypatch.setattr(peft_accel.ops, "dora_linear", lambda *a: calls.append(1) or real(*a))
    config = peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, use_dora=True, target_modules=DORA_TARGETS[family]
    )
    plain = peft.get_peft_model(tiny_model(family), config)
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B" in name or "lora_magnitude_vector" in name:
                p.add_(torch.randn_like(p) * 0.1)  # B != 0 and m != ‖W‖: both terms of DoRA matter
    fast = fastadapters.accelerate(copy.deepcopy(plain), verbose=False)
    inputs = batch()
    out_fast, out_plain = fast(**inputs), plain(**inputs)
    assert len(calls) == 2 * len(DORA_TARGETS[family])
    close(out_fast.logits, out_plain.logits, "step", "DoRA logits")
    out_fast.loss.backward(), out_plain.loss.backward()
    g_plain = grads_of(plain)
    assert any("lora_magnitude_vector" in n for n in g_plain)
    for name, g in grads_of(fast).items():
        close(g, g_plain[name], "step", f"DoRA grad of {name}")


def test_dora_ops_match_reference():
    from fastadapters import reference

    torch.manual_seed(0)
    x = torch.randn(3, 5, 37, requires_grad=True)
    w, bias = torch.randn(29, 37), torch.randn(29)
    a, b = torch.randn(3, 37, requires_grad=True), torch.randn(29, 3, requires_grad=True)
    m = torch.rand(29, requires_grad=True) + 0.5
    norm = fastadapters.ops.lora_weight_norm(w, a, b, 0.7)
    close(norm, torch.linalg.norm(w + 0.7 * b @ a, dim=1), "step", "norm without the merged weight")
    assert not norm.requires_grad
    y = fastadapters.ops.dora_linear(x, w, bias, a, b, m, 0.7)
    ref = reference.dora_linear(x, w, bias, a, b, m, 0.7)
    close(y, ref, "step", "dora_linear")
    grads = torch.autograd.grad(y.square().sum(), (x, a, b, m))
    grads_ref = torch.autograd.grad(ref.square().sum(), (x, a, b, m))
    for name, g, g_ref in zip("x a b m".split(), grads, grads_ref):
        close(g, g_ref, "step", f"d{name}")
    with pytest.raises(ValueError, match=r"magnitude must have shape \(29,\) \(d_out\)"):
        fastadapters.ops.dora_linear(x, w, bias, a, b, m[:5], 0.7)


def test_embedding_lora_matches_peft(monkeypatch):
    from fastadapters import peft_accel

    calls = []
    real = peft_accel.ops.lora_embedding
    monkeypatch.setattr(peft_accel.ops, "lora_embedding", lambda *a: calls.append(1) or real(*a))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    plain = peft.get_peft_model(tiny_model("llama"), config)
    plain.add_adapter("other", peft.LoraConfig(r=2, target_modules=["embed_tokens"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_embedding_B" in name:
                p.normal_(0, 0.2)
    fast = fastadapters.accelerate(copy.deepcopy(plain), verbose=False)
    embed = fast.base_model.model.model.embed_tokens
    assert type(embed).__name__ == "AcceleratedLoraEmbedding" and repr(embed).startswith("lora.Embedding(")
    inputs = batch()
    for active in (["default"], ["default", "other"]):
        fast.base_model.set_adapter(active), plain.base_model.set_adapter(active)
        fast.zero_grad(), plain.zero_grad()
        out_fast, out_plain = fast(**inputs), plain(**inputs)
        close(out_fast.logits, out_plain.logits, "step", f"embedding LoRA, active {active}")
        out_fast.loss.backward(), out_plain.loss.backward()
        g_plain = grads_of(plain)
        assert any("lora_embedding_A" in n for n in g_plain)
        for name, g in grads_of(fast).items():
            close(g, g_plain[name], "step", f"grad of {name}")
    assert len(calls) == 2


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv1d(3, 6, 3, stride=2, padding=1)
        self.c2 = torch.nn.Conv2d(6, 5, (3, 2), padding=(1, 0), bias=False)
        self.c3 = torch.nn.Conv3d(5, 4, 1)

    def forward(self, x):  # x: [N, 3, 24]
        h = torch.relu(self.c1(x)).view(x.shape[0], 6, 3, 4)
        return self.c3(self.c2(h).unsqueeze(2)).flatten(1)


def test_conv_lora_matches_peft(monkeypatch):
    from fastadapters import peft_accel

    calls = []
    real = peft_accel.ops.lora_conv
    monkeypatch.setattr(peft_accel.ops, "lora_conv", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    plain = peft.get_peft_model(ConvNet(), peft.LoraConfig(r=2, target_modules=["c1", "c2", "c3"]))
    plain.add_adapter("other", peft.LoraConfig(r=3, target_modules=["c2"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if "lora_B.default" in name:
                p.normal_(0, 0.3)
    fast = fastadapters.accelerate(copy.deepcopy(plain), verbose=False)
    assert repr(fast) == repr(plain) and "3 LoRA layers accelerated" in fast.fastadapters_summary
    x = torch.randn(2, 3, 24)
    for active in (["default"], ["default", "other"]):
        fast.base_model.set_adapter(active), plain.base_model.set_adapter(active)
        fast.zero_grad(), plain.zero_grad()
        out_fast, out_plain = fast(x), plain(x)
        close(out_fast, out_plain, "step", f"conv LoRA, active {active}")
        out_fast.square().sum().backward(), out_plain.square().sum().backward()
        g_plain = grads_of(plain)
        assert any("lora_A.default" in n for n in g_plain)
        for name, g in grads_of(fast).items():
            close(g, g_plain[name], "step", f"grad of {name}")
    assert len(calls) == 6
