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
    fastadapters.accelerate(model, verbose=False)
    summary = model.fastadapters_summary
    # 2 layers x (q_proj, v_proj) accelerated; 2 k_proj with DoRA and the embedding left on PEFT.
    assert summary.startswith("fastadapters.accelerate: 4 LoRA layers accelerated, 3 left on PEFT"), summary
    assert "2: DoRA" in summary and "1: not a LoRA Linear (lora.layer.Embedding)" in summary, summary
    assert sum(isinstance(m, AcceleratedLoraLinear) for m in model.modules()) == 4


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
