"""Two-process DDP (torchrun, gloo, CPU): both ranks end with identical adapter weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from fastadapters.demo import arithmetic_dataset, save_base_model
from fastadapters.prompts import generate_prompt

# Runs fastadapters.train's code path under torchrun, then every rank writes what it holds.
RANK_SCRIPT = """
import os, sys
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from fastadapters import train
from fastadapters.io import adapter_state_dict

out = sys.argv[1]
result = train.run(train.build_parser().parse_args(sys.argv[2:]))
model, rank = result.model, int(os.environ["RANK"])
assert isinstance(result.trainer.model_wrapped, DistributedDataParallel), type(result.trainer.model_wrapped)
assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
state = adapter_state_dict(model)
state["base.q_proj"] = model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().contiguous()
save_file(state, os.path.join(out, f"rank{rank}.safetensors"))
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_identical_adapters(tmp_path):
    items = arithmetic_dataset(48, seed=5)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(items))
    base = save_base_model(
        str(tmp_path / "base"), [generate_prompt(x["instruction"], "", x["output"]) for x in items], hidden=32
    )
    script = tmp_path / "rank_script.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "adapter"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
        str(tmp_path), "--base-model", base, "--data-path", str(data), "--output-dir", str(out),
        "--batch-size", "16", "--micro-batch-size", "4", "--max-steps", "3", "--val-set-size", "8",
        "--eval-step", "2", "--save-step", "2", "--learning-rate", "1e-2", "--warmup-steps", "0",
        "--lora-dropout", "0.1", "--target-modules", "q_proj,v_proj,down_proj", "--no-progress",
    ]  # fmt: skip
    # CPU processes even on a GPU machine: two ranks cannot share one GPU under DDP.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert set(ranks[0]) == set(ranks[1]) and len(ranks[0]) == 2 * 3 * 2 + 1  # A and B, 3 targets, 2 layers
    for name in ranks[0]:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between the ranks"
    trained_b = [v for k, v in ranks[0].items() if k.endswith("lora_B.weight")]
    assert all(v.abs().sum() > 0 for v in trained_b)  # B starts at zero: the ranks did train
    saved = load_file(str(out / "adapter.safetensors"))  # rank 0 wrote the result
    for name, value in saved.items():
        assert torch.equal(value, ranks[0][name])
    from transformers import AutoModelForCausalLM

    frozen = AutoModelForCausalLM.from_pretrained(base).model.layers[0].self_attn.q_proj.weight
    assert torch.equal(ranks[0]["base.q_proj"], frozen)  # base weights untouched

    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["gradient_accumulation_steps"] == 2 and summary["effective_batch_size"] == 16  # 16 / 4 / 2
