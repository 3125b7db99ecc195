"""The `fastadapters` CLI: an end-to-end train + eval on the real LLM-Adapters files, and bad input."""

import builtins
import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from models import pipeline_base

import fastadapters
from fastadapters import cli, evaluate
from fastadapters.demo import arithmetic_dataset, build_model

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "datasets" / "llm-adapters"
TRAIN_FLAGS = [
    "--batch-size", "8", "--micro-batch-size", "4", "--cutoff-len", "96", "--learning-rate", "1e-3",
    "--warmup-steps", "0", "--logging-steps", "1", "--no-progress", "--precision", "fp32",
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Every test of this module on one thread (conftest's one_thread)."""


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A tiny base model folder and a 16-item synthetic dataset file."""
    root = tmp_path_factory.mktemp("cli")
    items = arithmetic_dataset(16, seed=3)
    data = root / "data.json"
    data.write_text(json.dumps(items))
    return {"root": root, "base": pipeline_base(root / "base", items), "data": str(data)}


def _run_cli(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent")
def test_train_then_eval_end_to_end(tmp_path, capsys):
    items = json.loads((SHARED_DATA / "train" / "math_data.json").read_text())[:32]
    data = tmp_path / "math32.json"
    data.write_text(json.dumps(items))
    base = pipeline_base(tmp_path / "base", items, hidden=48)
    out = tmp_path / "adapter"
    code, stdout, err = _run_cli(
        ["train", "--base-model", base, "--data-path", str(data), "--output-dir", str(out),
         "--adapter", "lora", "--val-set-size", "8", "--max-steps", "3", "--eval-step", "2",
         "--save-step", "2", "--target-modules", "q_proj,v_proj,up_proj", *TRAIN_FLAGS],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "trainable params:" in stdout
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 3 and summary["train_examples"] == 24 and summary["val_examples"] == 8
    assert summary["gradient_accumulation_steps"] == 2 and summary["effective_batch_size"] == 8
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["trainable_percent"] == pytest.approx(
        100 * summary["trainable_params"] / summary["total_params"]
    )
    assert all(summary[k] > 0 for k in ("train_loss_final", "train_loss_mean", "eval_loss", "seconds"))
    assert (out / "adapter.safetensors").is_file() and (
        out / "checkpoint-2" / "adapter.safetensors"
    ).is_file()
    assert not list(out.glob("**/model.safetensors"))  # checkpoints hold the adapter, never the base

    evals = tmp_path / "eval"
    code, stdout, err = _run_cli(
        ["eval", "--base-model", base, "--adapter", str(out), "--dataset", "gsm8k,boolq", "--data-dir",
         str(SHARED_DATA), "--limit", "20", "--batch-size", "8", "--num-beams", "2", "--max-new-tokens", "12",
         "--output-dir", str(evals), "--dtype", "float32"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "gsm8k" in stdout and "boolq" in stdout and "accuracy" in stdout
    result = json.loads((evals / "summary.json").read_text())
    records = [json.loads(line) for line in (evals / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 40
    assert result["settings"]["limit"] == 20 and result["settings"]["num_beams"] == 2
    assert result["settings"]["adapter"] == str(out)
    for name in ("gsm8k", "boolq"):
        mine = [r for r in records if r["dataset"] == name]
        labels = [x["answer"] for x in json.loads((SHARED_DATA / name / "test.json").read_text())[:20]]
        assert [r["index"] for r in mine] == list(range(20)) and [r["label"] for r in mine] == labels
        for r in mine:
            assert set(r) == {"dataset", "index", "prompt", "response", "answer", "label", "correct"}
            assert r["prompt"].endswith("### Response:\n")
            assert r["answer"] == evaluate.extract_answer(name, r["response"])
            assert r["correct"] is evaluate.score(name, r["response"], r["label"])
        entry = result["datasets"][name]
        assert entry["total"] == 20 and entry["correct"] == sum(r["correct"] for r in mine)
        assert entry["accuracy"] == pytest.approx(entry["correct"] / 20)
    assert result["mean_accuracy"] == pytest.approx(
        (result["datasets"]["gsm8k"]["accuracy"] + result["datasets"]["boolq"]["accuracy"]) / 2
    )


def test_eval_matches_unbatched_generation(synthetic, tmp_path):
    """Left padding with a real attention mask: batched responses equal one-at-a-time ones."""
    data_dir = tmp_path / "d"
    (data_dir / "AddSub").mkdir(parents=True)
    items = arithmetic_dataset(5, seed=9)
    items[1]["instruction"] = (
        "What is 1 + 2 + 3 + 4 + 5 + 6 + 7 + 8 + 9 + 10 + 11 + 12 + 13?"  # a longer prompt
    )
    (data_dir / "AddSub" / "test.json").write_text(json.dumps(items))
    model, tok = evaluate.load_model(synthetic["base"], dtype=torch.float32, device="cpu")
    assert not model.training and tok.padding_side == "left" and tok.pad_token_id == 0
    runs = []
    for batch_size in (5, 1):
        settings = evaluate.EvalSettings(batch_size=batch_size, num_beams=2, max_new_tokens=6)
        out = str(tmp_path / f"b{batch_size}")
        evaluate.run(synthetic["base"], ["AddSub"], str(data_dir), output_dir=out, settings=settings,
                     model=model, tokenizer=tok, log=None)  # fmt: skip
        lines = (tmp_path / f"b{batch_size}" / "predictions.jsonl").read_text().splitlines()
        runs.append([json.loads(line)["response"] for line in lines])
    assert runs[0] == runs[1]


def _train_argv(synthetic, tmp_path, *extra):
    return ["train", "--base-model", synthetic["base"], "--data-path", synthetic["data"],
            "--output-dir", str(tmp_path / "out"), "--val-set-size", "0", "--max-steps", "1",
            *TRAIN_FLAGS, *extra]  # fmt: skip


def test_bad_train_input(synthetic, tmp_path, capsys):
    no_fields = tmp_path / "three_fields.json"
    no_fields.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a"}]))
    cases = [
        (["--data-path", str(tmp_path / "missing.json")], "data file not found"),
        (["--data-path", str(no_fields)], "lacks the field(s) ['answer']"),
        (["--adapter", "lorax"], "unknown adapter 'lorax'"),
        (
            ["--micro-batch-size", "16", "--batch-size", "8"],
            "--micro-batch-size (16) must not exceed --batch-size (8)",
        ),
        (["--base-model", str(tmp_path / "no_model")], "base model folder not found"),
        (["--val-set-size", "16"], "leaves no training data"),
    ]
    for extra, message in cases:
        code, _, err = _run_cli(_train_argv(synthetic, tmp_path, *extra), capsys)
        assert code == 2, (extra, err)
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_bad_eval_input(synthetic, tmp_path, capsys):
    other = tmp_path / "other_adapter"
    model = build_model(320, hidden=48, layers=2)  # another base model: hidden 48, not 32
    fastadapters.apply(model, fastadapters.LoraConfig(target_modules=["q_proj"]))
    fastadapters.save(model, str(other))
    data_dir = tmp_path / "d"
    (data_dir / "gsm8k").mkdir(parents=True)
    (data_dir / "gsm8k" / "test.json").write_text(json.dumps(arithmetic_dataset(3, seed=4)))
    base = ["eval", "--base-model", synthetic["base"], "--output-dir", str(tmp_path / "e")]
    cases = [
        (["--dataset", "gsm9k", "--data-dir", str(data_dir)], "unknown dataset 'gsm9k'"),
        (["--dataset", "gsm8k", "--data-dir", str(tmp_path / "nowhere")], "data directory not found"),
        (["--dataset", "boolq", "--data-dir", str(data_dir)], "boolq/test.json"),
        (["--dataset", "gsm8k", "--data-dir", str(data_dir), "--adapter", str(other)],
         "different base model"),
        (["--dataset", "gsm8k", "--data-dir", str(data_dir), "--adapter", str(tmp_path / "none")],
         "adapter folder not found"),
    ]  # fmt: skip
    for extra, message in cases:
        code, _, err = _run_cli(base + extra, capsys)
        assert code == 2, (extra, err)
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "e").exists()


def test_console_script_exit_code(synthetic, tmp_path):
    """The real process: status 2, one clear line on stderr, no traceback."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastadapters.train", "--base-model", synthetic["base"], "--data-path",
         str(tmp_path / "missing.json"), "--output-dir", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "fastadapters train: error: data file not found" in proc.stderr and "Traceback" not in proc.stderr


# A line that another library's warning may add to stderr (the warning, or the source line it quotes).
_WARNING_LINE = re.compile(r"Warning\b|^\s")
_ERROR_LINE = re.compile(r"^fastadapters (train|eval): error: \S")


def _cli_error(argv, capsys) -> tuple[int, list[str], str]:
    """(exit status, stderr lines other than warnings, whole stderr) of `fastadapters argv`."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse exits by itself
        code = exc.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip() and not _WARNING_LINE.search(line)], err


@contextlib.contextmanager
def _unreadable(path: Path, monkeypatch):
    """`path` cannot be opened: chmod 000, and where that does not stop this user (root), open() refuses."""
    mode = path.stat().st_mode
    path.chmod(0)
    try:
        with monkeypatch.context() as m:
            if os.access(path, os.R_OK):
                real_open = builtins.open

                def refusing_open(file, *args, **kwargs):
                    if isinstance(file, (str, os.PathLike)) and os.path.abspath(file) == str(path):
                        raise PermissionError(errno.EACCES, "Permission denied", str(path))
                    return real_open(file, *args, **kwargs)

                m.setattr(builtins, "open", refusing_open)
            yield
    finally:
        path.chmod(mode)


@pytest.fixture(scope="module")
def broken_bases(synthetic, tmp_path_factory):
    """Base-model folders that cannot be loaded: no config.json, an unknown model_type, pickle weights."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("broken")
    folders = {}
    for name in ("no_config", "unknown_type", "pickle_only"):
        folders[name] = root / name
        shutil.copytree(synthetic["base"], folders[name])
    (folders["no_config"] / "config.json").unlink()
    config = json.loads((folders["unknown_type"] / "config.json").read_text())
    (folders["unknown_type"] / "config.json").write_text(json.dumps({**config, "model_type": "llamax"}))
    weights = folders["pickle_only"] / "model.safetensors"
    torch.save(load_file(str(weights)), folders["pickle_only"] / "pytorch_model.bin")  # never loaded back
    weights.unlink()
    return folders


def test_every_bad_input_is_one_line_and_status_2(synthetic, broken_bases, tmp_path, monkeypatch, capsys):
    """Issue 17 item 5: every case, through `fastadapters train` and `fastadapters eval`: status 2, one line
    `fastadapters <command>: error: ...` on stderr (warnings of other libraries aside), no traceback."""
    data_dir = tmp_path / "d"
    (data_dir / "gsm8k").mkdir(parents=True)
    (data_dir / "gsm8k" / "test.json").write_text(json.dumps(arithmetic_dataset(3, seed=4)))
    train_data = tmp_path / "train.json"
    shutil.copy(synthetic["data"], train_data)
    adapter = tmp_path / "adapter"
    model = build_model(320, hidden=32, layers=2)
    fastadapters.apply(model, fastadapters.LoraConfig(target_modules=["q_proj"]))
    fastadapters.save(model, str(adapter))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    evals = [
        "eval",
        "--base-model",
        synthetic["base"],
        "--dataset",
        "gsm8k",
        "--data-dir",
        str(data_dir),
        "--output-dir",
        str(tmp_path / "e"),
        "--num-beams",
        "1",
        "--max-new-tokens",
        "2",
        "--dtype",
        "float32",
    ]
    train = _train_argv(synthetic, tmp_path, "--data-path", str(train_data))
    bad = {name: ["--base-model", str(folder)] for name, folder in broken_bases.items()}
    cases = [  # (argv, what the message says, a file made unreadable or None)
        (train + ["--seed", "-1"], "--seed must be in [0, 2**32), got -1", None),
        (train + ["--warmup-steps", "-5"], "--warmup-steps must be >= 0, got -5", None),
        (train + ["--learning-rate", "nan"], "--learning-rate must be a finite number, got nan", None),
        (train + ["--learning-rate", "-1"], "--learning-rate must be > 0, got -1.0", None),
        (train + ["--num-epochs", "nan"], "--num-epochs must be a finite number, got nan", None),
        (train + ["--fsdp", "garbage"], "--fsdp: unknown option(s) ['garbage']", None),
        (train + ["--max-steps", "0"], "--max-steps must be >= 1, or -1 to train for --num-epochs", None),
        (train + ["--batch-size", "abc"], "argument --batch-size/--batch_size: invalid int value", None),
        (train + ["--learning-rate", "fast"], "invalid float value: 'fast'", None),
        (train + ["--lora-r"], "argument --lora-r/--lora_r: expected one argument", None),
        (train + bad["no_config"], "has no config.json", None),
        (train + bad["unknown_type"], "model_type 'llamax' is not a model type", None),
        (train + bad["pickle_only"], "holds its weights only as pickles (pytorch_model.bin)", None),
        (train, f"cannot read data file {train_data}: Permission denied", train_data),
        (train + ["--output-dir", str(a_file)], f"--output-dir {a_file} is a file; expected a folder", None),
        (evals + bad["no_config"], "has no config.json", None),
        (evals + bad["unknown_type"], "model_type 'llamax' is not a model type", None),
        (evals + bad["pickle_only"], "holds its weights only as pickles", None),
        (evals, "test.json: Permission denied", data_dir / "gsm8k" / "test.json"),
        (evals + ["--adapter", str(adapter)], "Permission denied", adapter / "fastadapters_config.json"),
        (evals + ["--output-dir", str(a_file)], f"--output-dir {a_file} is a file; expected a folder", None),
        (evals + ["--num-beams", "x"], "argument --num-beams/--num_beams: invalid int value: 'x'", None),
        (evals + ["--bogus"], "unrecognized arguments: --bogus", None),
    ]
    for argv, message, unreadable in cases:
        with _unreadable(unreadable, monkeypatch) if unreadable else contextlib.nullcontext():
            code, lines, err = _cli_error(argv, capsys)
        assert code == 2, (argv[-2:], err)
        assert len(lines) == 1 and _ERROR_LINE.match(lines[0]), (argv[-2:], err)
        assert message in lines[0] and lines[0].startswith(f"fastadapters {argv[0]}: "), (message, err)
        assert "Traceback" not in err and "usage:" not in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
@pytest.mark.parametrize("how", ["a file", "under a file", "read-only"])
def test_unwritable_output_dir_fails_before_the_model_loads(
    command, how, synthetic, tmp_path, monkeypatch, capsys
):
    from fastadapters import data, train

    def no_model(*args, **kwargs):
        pytest.fail("a model was loaded before the output folder was checked")

    monkeypatch.setattr(train, "load_base", no_model)
    monkeypatch.setattr(evaluate, "load_model", no_model)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    if how == "a file":
        out = a_file
    elif how == "under a file":
        out = a_file / "out"
    else:
        out = tmp_path / "read_only"
        out.mkdir()
        out.chmod(0o500)
        if os.access(
            out, os.W_OK
        ):  # root writes anywhere: the probe file's creation fails as it would for others
            mkstemp = data.tempfile.mkstemp

            def refusing_mkstemp(*args, dir=None, **kwargs):
                if dir is not None and os.path.abspath(dir) == str(out):
                    raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, "probe"))
                return mkstemp(*args, dir=dir, **kwargs)

            monkeypatch.setattr(data.tempfile, "mkstemp", refusing_mkstemp)
    data_dir = tmp_path / "d"
    (data_dir / "gsm8k").mkdir(parents=True)
    (data_dir / "gsm8k" / "test.json").write_text(json.dumps(arithmetic_dataset(3, seed=4)))
    if command == "train":
        argv = _train_argv(synthetic, tmp_path, "--output-dir", str(out))
    else:
        argv = ["eval", "--base-model", synthetic["base"], "--dataset", "gsm8k", "--data-dir", str(data_dir),
                "--output-dir", str(out)]  # fmt: skip
    code, lines, err = _cli_error(argv, capsys)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"fastadapters {command}: error: --output-dir {out} "), err
    assert ("not writable" if how == "read-only" else "folder") in lines[0], err
