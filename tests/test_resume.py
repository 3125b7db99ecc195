"""Long runs lose nothing: an evaluation killed (SIGKILL) or stopped (Ctrl-C) and resumed, and a training
stopped at step k and resumed, end exactly as uninterrupted runs do."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from models import pipeline_base
from safetensors.torch import load_file

from fastadapters import cli, evaluate, train
from fastadapters.demo import arithmetic_dataset

ROOT = Path(__file__).resolve().parents[1]
SETS = {"AddSub": 8, "gsm8k": 6}  # items per set; batches of 2, so a set is several batches
EVAL_FLAGS = [
    "--batch-size",
    "2",
    "--num-beams",
    "2",
    "--max-new-tokens",
    "4",
    "--dtype",
    "float32",
    "--no-progress",
]
TRAIN_FLAGS = [
    "--batch-size", "8", "--micro-batch-size", "4", "--cutoff-len", "64", "--learning-rate", "1e-2",
    "--warmup-steps", "2", "--logging-steps", "1", "--no-progress", "--precision", "fp32",
    "--val-set-size", "0", "--max-steps", "5", "--save-step", "100", "--seed", "7",
]  # fmt: skip
# 16 items, micro-batches of 4, 2 per optimizer step: 2 steps per epoch, so 5 steps end inside epoch 3 and
# step 3 is inside epoch 2 (the resumed run must skip the epoch's first batches and keep its order).
ADAPTERS = {
    "lora": [
        "--adapter",
        "lora",
        "--lora-r",
        "4",
        "--lora-dropout",
        "0.1",
        "--target-modules",
        "q_proj,v_proj",
    ],
    "series": ["--adapter", "series", "--bottleneck-size", "8", "--adapter-dropout", "0.1"],
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module on one thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny base model folder, a 16-item training file and an evaluation data folder of two sets."""
    root = tmp_path_factory.mktemp("resume")
    items = arithmetic_dataset(16, seed=3)
    (root / "train.json").write_text(json.dumps(items))
    base = pipeline_base(root / "base", items)
    for seed, (name, n) in enumerate(SETS.items()):
        (root / "data" / name).mkdir(parents=True)
        (root / "data" / name / "test.json").write_text(json.dumps(arithmetic_dataset(n, seed=10 + seed)))
    return {"root": root, "base": base, "train": str(root / "train.json"), "data": str(root / "data")}


def _eval_argv(tiny, out) -> list[str]:
    return ["eval", "--base-model", tiny["base"], "--dataset", ",".join(SETS), "--data-dir", tiny["data"],
            "--output-dir", str(out), *EVAL_FLAGS]  # fmt: skip


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "predictions.jsonl").read_text().splitlines()]


def _summary(out) -> dict:
    summary = json.loads((Path(out) / "summary.json").read_text())
    for key in evaluate.TIMING_FIELDS:
        summary["settings"].pop(key)
    return summary


@pytest.fixture(scope="module")
def reference_eval(tiny):
    """An uninterrupted evaluation: the records and summary every resumed run must reproduce."""
    out = tiny["root"] / "eval-reference"
    assert cli.main(_eval_argv(tiny, out)) == 0
    records = _records(out)
    assert [(r["dataset"], r["index"]) for r in records] == [
        (d, i) for d, n in SETS.items() for i in range(n)
    ]
    summary = _summary(out)
    assert summary["complete"] and summary["items_done"] == summary["items_total"] == sum(SETS.values())
    return records, summary


# The child process: each batch takes at least 0.3 s, so the test can kill it while a set is half done.
_SLOW_EVAL = """
import sys, time, torch
torch.set_num_threads(1)
from fastadapters import cli, evaluate
generate = evaluate.generate
def slow(*args, **kwargs):
    time.sleep(0.3)
    return generate(*args, **kwargs)
evaluate.generate = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_eval_killed_then_resumed_equals_uninterrupted(tiny, reference_eval, capsys):
    out = tiny["root"] / "eval-killed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_EVAL, *_eval_argv(tiny, out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT,
    )  # fmt: skip
    predictions = out / "predictions.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if predictions.is_file() and predictions.read_text().count("\n") >= 4:  # two batches of AddSub
                break
            time.sleep(0.02)
        assert proc.poll() is None, f"the evaluation ended before it was killed: {proc.stderr.read()!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    lines = predictions.read_text().splitlines(keepends=True)
    done = len(lines)
    assert 4 <= done < SETS["AddSub"], "killed in the middle of the first set"
    assert not (out / "summary.json").exists()
    # What else a kill can leave: a batch written only in part, and half a line.
    predictions.write_text("".join(lines[:-1]) + lines[-1][:25])

    code = cli.main(_eval_argv(tiny, out) + ["--resume"])
    assert code == 0, capsys.readouterr().err
    records, summary = reference_eval
    assert _records(out) == records
    assert _summary(out) == summary


def test_eval_ctrl_c_stops_after_the_batch_then_resumes(tiny, reference_eval, monkeypatch, capsys):
    out = tiny["root"] / "eval-interrupted"
    generate, calls = evaluate.generate, []

    def interrupt_in_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the second batch is generated
        return generate(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", interrupt_in_second_batch)
    argv = _eval_argv(tiny, out)
    assert cli.main(argv) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert f"resume with: fastadapters {' '.join(argv)} --resume" in err
    assert len(calls) == 2 and len(_records(out)) == 4  # the second batch was finished and written
    partial = json.loads((out / "summary.json").read_text())
    assert not partial["complete"] and partial["items_done"] == 4
    assert list(partial["datasets"]) == ["AddSub"] and partial["datasets"]["AddSub"]["total"] == 4
    monkeypatch.setattr(evaluate, "generate", generate)

    assert cli.main(argv + ["--resume"]) == 0
    records, summary = reference_eval
    assert _records(out) == records and _summary(out) == summary
    # A finished run resumed again loads no model and changes nothing.
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("loaded a model for nothing"))
    assert cli.main(argv + ["--resume"]) == 0
    assert _records(out) == records and _summary(out) == summary


def test_eval_resume_refuses_other_settings(tiny, capsys, monkeypatch):
    out = tiny["root"] / "eval-settings"
    out.mkdir()
    (out / "run.json").write_text(json.dumps(evaluate.run_settings(
        tiny["base"], None, list(SETS), tiny["data"], evaluate.EvalSettings(batch_size=2, num_beams=2,
        max_new_tokens=4, extra={"dtype": "float32"}))))  # fmt: skip
    (out / "predictions.jsonl").write_text("")
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    argv = _eval_argv(tiny, out)
    for flag, value in [("--num-beams", "3"), ("--max-new-tokens", "5"), ("--dtype", "float16")]:
        changed = list(argv)
        changed[changed.index(flag) + 1] = value
        assert cli.main(changed + ["--resume"]) == cli.EXIT_USAGE
        err = capsys.readouterr().err.strip()
        name = flag[2:].replace("-", "_")
        assert err.startswith(f"fastadapters eval: error: --resume: {name} differs") and "\n" not in err, err
    # Predictions from something else entirely are refused, not silently mixed in.
    (out / "predictions.jsonl").write_text(json.dumps({"dataset": "boolq", "index": 0}) + "\n")
    assert cli.main(argv + ["--resume"]) == cli.EXIT_USAGE
    assert "line 1 holds item ('boolq', 0), expected ('AddSub', 0)" in capsys.readouterr().err
    # Without --resume, existing predictions are not overwritten silently.
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "already holds predictions: pass --resume" in capsys.readouterr().err


def _train_argv(tiny, out, adapter, *extra) -> list[str]:
    return ["train", "--base-model", tiny["base"], "--data-path", tiny["train"], "--output-dir", str(out),
            *TRAIN_FLAGS, *ADAPTERS[adapter], *extra]  # fmt: skip


def _adapter(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "adapter.safetensors"))


def _assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs by {(a[name] - b[name]).abs().max().item()}"


def _assert_resumable_checkpoint(folder: Path, model_adapter: dict):
    names = {p.name for p in folder.iterdir()}
    assert {"adapter.safetensors", "fastadapters_config.json", "optimizer.pt", "scheduler.pt",
            "rng_state.pth", "trainer_state.json"} <= names, names  # fmt: skip
    assert not [n for n in names if n.startswith(("model", "pytorch_model"))]  # never the base weights
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(model_adapter)  # Adam moments of the adapter parameters only


def test_train_ctrl_c_then_resume_equals_uninterrupted_lora(tiny, monkeypatch, capsys):
    from transformers import TrainerCallback

    reference, out = tiny["root"] / "lora-reference", tiny["root"] / "lora-interrupted"
    assert cli.main(_train_argv(tiny, reference, "lora")) == 0
    expected = _adapter(reference)

    class CtrlCAtStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGINT)

    run = train.run
    monkeypatch.setattr(train, "run", lambda args, **kw: run(args, callbacks=[CtrlCAtStep3()], **kw))
    argv = _train_argv(tiny, out, "lora")
    assert cli.main(argv) == cli.EXIT_INTERRUPTED
    err = capsys.readouterr().err
    assert f"resume with: fastadapters {' '.join(argv)} --resume-from-checkpoint" in err
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (out / "adapter.safetensors").exists() and not (out / "train_summary.json").exists()
    _assert_resumable_checkpoint(out / "checkpoint-3", expected)
    monkeypatch.setattr(train, "run", run)

    assert cli.main(argv + ["--resume-from-checkpoint"]) == 0  # latest
    assert "resuming from" in capsys.readouterr().out
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 5
    _assert_bitwise_equal(_adapter(out), expected)


def test_train_resume_from_checkpoint_path_equals_uninterrupted_bottleneck(tiny, capsys):
    reference, out = tiny["root"] / "series-reference", tiny["root"] / "series-resumed"
    assert cli.main(_train_argv(tiny, reference, "series", "--save-step", "3")) == 0
    _assert_resumable_checkpoint(reference / "checkpoint-3", _adapter(reference))
    checkpoint = str(reference / "checkpoint-3")
    assert cli.main(_train_argv(tiny, out, "series", "--resume_from_checkpoint", checkpoint)) == 0
    _assert_bitwise_equal(_adapter(out), _adapter(reference))
    # A finished adapter folder (no trainer state) is a warm start: its weights, then all the steps.
    warm = tiny["root"] / "series-warm"
    capsys.readouterr()
    assert cli.main(_train_argv(tiny, warm, "series", "--resume-from-checkpoint", str(reference))) == 0
    assert "an adapter without trainer state: starting from its weights at step 0" in capsys.readouterr().out
    assert json.loads((warm / "train_summary.json").read_text())["steps"] == 5
    # A checkpoint of another adapter configuration is refused before training, naming the difference.
    argv = _train_argv(tiny, tiny["root"] / "series-other", "series", "--bottleneck-size", "4",
                       "--resume-from-checkpoint", checkpoint)  # fmt: skip
    capsys.readouterr()
    assert cli.main(argv) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert "its adapter settings differ (bottleneck_size: checkpoint 8, now 4)" in err and "\n" not in err
