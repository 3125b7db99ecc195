"""LLM-Adapters evaluation: batched generation on the math and commonsense test sets, and their scorer.

Scoring rules (LLM_ADAPTERS.md):
- numeric math sets: remove commas, take the LAST match of -?\\d+\\.?\\d*; correct when
  |pred - label| <= 0.001.
- multiple choice (AQuA, mathqa): the last stand-alone letter A-E; first_letter=True reproduces the paper
  (the first A-E anywhere, even inside a word such as the "A" of "A car").
- commonsense: the first match of the dataset's answer pattern, equal to the label.
No answer found means wrong.

Long runs lose nothing: each batch's predictions are appended to predictions.jsonl (and flushed) as soon as
the batch is done, the settings are kept in run.json beside them, and `run(resume=True)` continues an
interrupted run from the file (see `run`).
"""

import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field

import torch

from fastadapters.data import DataError, UsageError, check_output_dir, load_json_dataset, prepare_tokenizer
from fastadapters.prompts import generate_prompt

NUMERIC = ("gsm8k", "SVAMP", "AddSub", "MultiArith", "SingleEq", "mawps")
MULTIPLE_CHOICE = ("AQuA", "mathqa")
MATH = NUMERIC + MULTIPLE_CHOICE
COMMONSENSE_PATTERNS = {
    "boolq": r"true|false",
    "piqa": r"solution1|solution2",
    "social_i_qa": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Easy": r"answer1|answer2|answer3|answer4|answer5",
    "ARC-Challenge": r"answer1|answer2|answer3|answer4|answer5",
    "openbookqa": r"answer1|answer2|answer3|answer4|answer5",
    "hellaswag": r"ending1|ending2|ending3|ending4",
    "winogrande": r"option1|option2",
}
COMMONSENSE = tuple(COMMONSENSE_PATTERNS)
# The 14 test sets of the paper plus mathqa; hellaswag is scored too when its file is supplied.
DATASETS = MATH + COMMONSENSE
DEFAULT_MAX_NEW_TOKENS = {"math": 256, "commonsense": 32}
DATA_DIR_ENV = "FASTADAPTERS_DATA_DIR"
PREDICTIONS_NAME = "predictions.jsonl"
SUMMARY_NAME = "summary.json"
RUN_NAME = "run.json"
TIMING_FIELDS = ("seconds",)  # the summary's settings entries that differ between identical runs

_NUMBER = re.compile(r"-?\d+\.?\d*")
_LETTER_ANYWHERE = re.compile(r"A|B|C|D|E")
_LETTER_ALONE = re.compile(r"(?<![A-Za-z])[A-E](?![A-Za-z])")
NUMERIC_TOLERANCE = 0.001


def check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(DATASETS)}")
    return dataset


def extract_answer(dataset: str, response: str, first_letter: bool = False):
    """The answer found in `response`: a float (numeric sets), a letter or a pattern word; None if absent."""
    check_dataset(dataset)
    if dataset in NUMERIC:
        numbers = _NUMBER.findall(response.replace(",", ""))
        if not numbers:
            return None
        try:
            return float(numbers[-1])
        except ValueError:
            return None
    if dataset in MULTIPLE_CHOICE:
        if first_letter:
            letters = _LETTER_ANYWHERE.findall(response.strip())
            return letters[0] if letters else None
        letters = _LETTER_ALONE.findall(response)
        return letters[-1] if letters else None
    found = re.findall(COMMONSENSE_PATTERNS[dataset], response.strip())
    return found[0] if found else None


def score(dataset: str, response: str, label: str, first_letter: bool = False) -> bool:
    """Whether `response` answers `label` correctly under the dataset's rule."""
    return is_correct(dataset, extract_answer(dataset, response, first_letter), label)


def is_correct(dataset: str, answer, label: str) -> bool:
    """Whether an extracted `answer` matches `label` (numeric: within 0.001; else exact)."""
    if answer is None:
        return False
    if dataset in NUMERIC:
        try:
            target = float(str(label).replace(",", ""))
        except ValueError:
            return False
        return math.isfinite(answer) and abs(answer - target) <= NUMERIC_TOLERANCE
    return answer == str(label).strip()


def default_max_new_tokens(dataset: str) -> int:
    return DEFAULT_MAX_NEW_TOKENS["math" if dataset in MATH else "commonsense"]


def dataset_path(data_dir: str, dataset: str) -> str:
    return os.path.join(data_dir, dataset, "test.json")


def resolve_datasets(names: list[str], data_dir: str) -> list[str]:
    """Checks dataset names; `all` means every known dataset whose test.json is in data_dir."""
    if "all" in names:
        present = [d for d in DATASETS if os.path.isfile(dataset_path(data_dir, d))]
        if not present:
            raise DataError(f"--dataset all: no <dataset>/test.json of {list(DATASETS)} found in {data_dir}")
        return present
    for name in names:
        check_dataset(name)
    return list(dict.fromkeys(names))


@dataclass
class EvalSettings:
    batch_size: int = 8
    num_beams: int = 4
    max_new_tokens: int | None = None  # None: 256 for math, 32 for commonsense
    limit: int | None = None
    first_letter: bool = False
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, num_beams: int) -> list[str]:
    """Responses of a batch of prompts: left padding, a real attention mask, beam search without sampling."""
    device = next(model.parameters()).device
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc["attention_mask"].to(device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # The prompt ends in "### Response:\n", so the response is exactly the generated continuation.
    return [r.strip() for r in tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)]


def iter_batches(model, tokenizer, dataset: str, data: list[dict], settings: EvalSettings, start: int = 0):
    """Yields the prediction records of each batch of `data[start:]` (batches of settings.batch_size)."""
    max_new = settings.max_new_tokens or default_max_new_tokens(dataset)
    for first in range(start, len(data), settings.batch_size):
        batch = data[first : first + settings.batch_size]
        prompts = [generate_prompt(item["instruction"], item["input"]) for item in batch]
        responses = generate(model, tokenizer, prompts, max_new, settings.num_beams)
        records = []
        for i, (item, prompt, response) in enumerate(zip(batch, prompts, responses)):
            answer = extract_answer(dataset, response, settings.first_letter)
            records.append(
                {
                    "dataset": dataset,
                    "index": first + i,
                    "prompt": prompt,
                    "response": response,
                    "answer": answer,
                    "label": item["answer"],
                    "correct": is_correct(dataset, answer, item["answer"]),
                }
            )
        yield records


def evaluate_dataset(model, tokenizer, dataset: str, data: list[dict], settings: EvalSettings, progress=None):
    """Prediction records of `data`, generated in batches of settings.batch_size."""
    records = []
    for batch in iter_batches(model, tokenizer, dataset, data, settings):
        records.extend(batch)
        if progress is not None:
            progress(dataset, len(records), len(data))
    return records


def summarize(records_by_dataset: dict[str, list[dict]]) -> dict:
    """{dataset: {correct, total, accuracy}} plus the unweighted mean accuracy over datasets (empty ones
    left out)."""
    per = {}
    for name, records in records_by_dataset.items():
        if not records:
            continue
        correct = sum(r["correct"] for r in records)
        per[name] = {
            "correct": correct,
            "total": len(records),
            "accuracy": correct / len(records) if records else 0.0,
        }
    mean = sum(v["accuracy"] for v in per.values()) / len(per) if per else 0.0
    return {"datasets": per, "mean_accuracy": mean}


def format_table(summary: dict) -> str:
    rows = [("dataset", "correct", "total", "accuracy")]
    for name, v in summary["datasets"].items():
        rows.append((name, str(v["correct"]), str(v["total"]), f"{100 * v['accuracy']:.1f}%"))
    if len(summary["datasets"]) > 1:
        rows.append(("mean", "", "", f"{100 * summary['mean_accuracy']:.1f}%"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]:>{widths[3]}}" for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def load_model(base_model: str, adapter: str | None = None, dtype=None, device=None):
    """(model in eval mode, tokenizer) for a local folder or hub name, with the adapter folder applied.

    `adapter` is a fastadapters folder (fastadapters_config.json) or a PEFT LoRA folder (adapter_config.json).
    A missing folder, or an adapter saved for another base model, raises UsageError.
    """
    import fastadapters
    from fastadapters import io
    from fastadapters.train import load_base

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.float16 if str(device).startswith("cuda") else torch.float32
    if adapter is not None and not os.path.isdir(adapter):
        raise UsageError(f"adapter folder not found: {adapter}")
    model, tokenizer = load_base(base_model, dtype)
    if adapter is not None:
        peft_only = not os.path.isfile(os.path.join(adapter, io.CONFIG_NAME)) and os.path.isfile(
            os.path.join(adapter, io.PEFT_CONFIG_NAME)
        )
        try:
            (fastadapters.load_peft if peft_only else fastadapters.load)(model, adapter)
        except (ValueError, OSError) as exc:  # OSError: a missing or unreadable file
            raise UsageError(f"cannot load adapter {adapter} onto {base_model}: {exc}") from None
    model.to(device)
    model.eval()
    return model, tokenizer


def run_settings(base_model: str, adapter, names: list[str], data_dir: str, settings: EvalSettings) -> dict:
    """What decides the predictions of a run: kept in run.json, and a resumed run must have the same."""
    info = {
        "base_model": base_model,
        "adapter": adapter,
        "datasets": list(names),
        "data_dir": os.path.abspath(data_dir),
        "batch_size": settings.batch_size,
        "num_beams": settings.num_beams,
        "max_new_tokens": {n: settings.max_new_tokens or default_max_new_tokens(n) for n in names},
        "limit": settings.limit,
        "first_letter": settings.first_letter,
        **settings.extra,
    }
    return json.loads(json.dumps(info))  # as it reads back from run.json


def _item_order(names: list[str], sizes: dict[str, int]) -> list[tuple[str, int]]:
    """(dataset, index) of every item, in the order a run writes them."""
    return [(name, i) for name in names for i in range(sizes[name])]


def read_predictions(path: str, names: list[str], sizes: dict[str, int], batch_size: int):
    """(records, size in bytes) of the whole batches at the start of an interrupted run's predictions.jsonl.

    A half-written last line, and the lines of a batch that was not written completely, are not counted: a
    resumed run writes from `size` on. A line that does not belong to this run raises UsageError.
    """
    with open(path, "rb") as f:
        raw = f.read()
    order = _item_order(names, sizes)
    records, kept, kept_size, offset = [], 0, 0, 0
    for number, line in enumerate(raw.split(b"\n")[:-1], start=1):  # the part after the last newline is cut
        offset += len(line) + 1
        try:
            record = json.loads(line)
            key = (record["dataset"], record["index"])
        except (ValueError, TypeError, KeyError):
            raise UsageError(
                f"{path}: line {number} is not a prediction record; use another --output-dir"
            ) from None
        if number > len(order) or key != order[number - 1]:
            expected = order[number - 1] if number <= len(order) else "the end of the file"
            raise UsageError(
                f"{path}: line {number} holds item {key}, expected {expected}: the file was not written by "
                "this evaluation; use another --output-dir"
            )
        records.append(record)
        name, index = key
        if (index + 1) % batch_size == 0 or index + 1 == sizes[name]:  # the last item of its batch
            kept, kept_size = len(records), offset
    return records[:kept], kept_size


def _write_json(path: str, data) -> None:
    """Writes JSON to a temporary file, then renames it over `path`, so a kill never leaves half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def check_output(output_dir: str, info: dict, names, sizes, batch_size: int, resume: bool, overwrite: bool):
    """Checks output_dir before any model is loaded; returns (records already done, bytes to keep).

    The folder must be writable. Without resume, predictions already there are refused unless overwrite.
    With resume, run.json must hold the same settings (else UsageError naming the first that differs).
    """
    check_output_dir(output_dir)
    predictions = os.path.join(output_dir, PREDICTIONS_NAME)
    run_file = os.path.join(output_dir, RUN_NAME)
    has_predictions = os.path.isfile(predictions) and os.path.getsize(predictions) > 0
    if not resume:
        if has_predictions and not overwrite:
            raise UsageError(
                f"{predictions} already holds predictions: pass --resume to continue that run, "
                "--overwrite to start again, or choose another --output-dir"
            )
        return [], 0
    if not os.path.isfile(run_file):
        if has_predictions:
            raise UsageError(f"--resume: {output_dir} holds predictions but no {RUN_NAME}; cannot check them")
        return [], 0
    try:
        with open(run_file, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--resume: cannot read {run_file}: {exc}") from None
    if not isinstance(saved, dict):
        raise UsageError(f"--resume: {run_file} is not a JSON object")
    for key in list(info) + [k for k in saved if k not in info]:
        if saved.get(key) != info.get(key):
            raise UsageError(
                f"--resume: {key} differs from the interrupted run in {output_dir}: it was "
                f"{saved.get(key)!r}, now {info.get(key)!r}; resume with the same settings, or choose "
                "another --output-dir"
            )
    if not os.path.isfile(predictions):
        return [], 0
    return read_predictions(predictions, names, sizes, batch_size)


def _open_predictions(output_dir: str, info: dict, keep: int):
    """Creates output_dir, writes run.json, and opens predictions.jsonl cut to `keep` bytes, for appending."""
    os.makedirs(output_dir, exist_ok=True)
    _write_json(os.path.join(output_dir, RUN_NAME), info)
    summary = os.path.join(output_dir, SUMMARY_NAME)
    if os.path.isfile(summary):
        os.remove(summary)  # stale until this run writes its own
    f = open(os.path.join(output_dir, PREDICTIONS_NAME), "ab")
    f.truncate(keep)
    return f


def _progress_bar(name: str, total: int, done: int, show: bool | None):
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=name, unit="item", file=sys.stderr, dynamic_ncols=True)


def run(
    base_model: str,
    datasets: list[str],
    data_dir: str,
    adapter: str | None = None,
    output_dir: str | None = None,
    settings: EvalSettings | None = None,
    model=None,
    tokenizer=None,
    log=print,
    *,
    dtype=None,
    resume: bool = False,
    overwrite: bool = True,
    progress: bool | None = None,
    should_stop=None,
) -> dict:
    """Evaluates on `datasets`; writes predictions.jsonl and summary.json to output_dir; returns the summary.

    A preloaded (model, tokenizer) may be passed to skip loading base_model/adapter (loaded with `dtype`
    otherwise, and only if items are left to generate). The data and output_dir are checked first. Each
    batch's records are appended to predictions.jsonl and flushed when the batch is done; run.json holds
    the settings. resume=True skips the items already in predictions.jsonl (run.json must match, see
    check_output); overwrite=False refuses a folder that already holds predictions. progress: a bar per
    dataset on stderr (None: when stderr is a terminal). should_stop() is polled after each batch: once it is
    true, the run stops there. The summary is computed from the whole predictions file; summary["complete"]
    says whether every item was scored (items_done of items_total). A KeyboardInterrupt writes the summary of
    what was done, then propagates.
    """
    settings = settings or EvalSettings()
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    names = resolve_datasets(datasets, data_dir)
    data = {}
    for name in names:
        items = load_json_dataset(dataset_path(data_dir, name))
        data[name] = items[: settings.limit] if settings.limit is not None else items
    sizes = {name: len(items) for name, items in data.items()}
    info = run_settings(base_model, adapter, names, data_dir, settings)
    done, keep = [], 0
    if output_dir is not None:
        done, keep = check_output(output_dir, info, names, sizes, settings.batch_size, resume, overwrite)
    records = {name: [r for r in done if r["dataset"] == name] for name in names}
    total = sum(sizes.values())
    if len(done) < total:
        if model is None:
            model, tokenizer = load_model(base_model, adapter, dtype=dtype)
        else:
            prepare_tokenizer(tokenizer)
            model.eval()
    out = _open_predictions(output_dir, info, keep) if output_dir is not None else None
    start = time.perf_counter()
    stopped = False
    try:
        for name in names:
            bar = _progress_bar(name, sizes[name], len(records[name]), progress)
            try:
                for batch in iter_batches(model, tokenizer, name, data[name], settings, len(records[name])):
                    if out is not None:
                        out.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in batch).encode())
                        out.flush()
                        os.fsync(out.fileno())
                    records[name].extend(batch)
                    if bar is not None:
                        bar.update(len(batch))
                    if should_stop is not None and should_stop():
                        stopped = len(records[name]) < sizes[name] or name != names[-1]
                        break
            finally:
                if bar is not None:
                    bar.close()
            if stopped:
                break
            acc = sum(r["correct"] for r in records[name]) / max(1, len(records[name]))
            if log:
                log(f"{name}: {100 * acc:.1f}% of {len(records[name])}")
    finally:
        if out is not None:
            out.close()
        summary = _finish(output_dir, names, sizes, records, info, settings, time.perf_counter() - start)
    return summary


def _finish(output_dir, names, sizes, records, info, settings, seconds) -> dict:
    """The summary, from the whole predictions file when there is one; written to summary.json."""
    if output_dir is not None:
        records, _ = read_predictions(
            os.path.join(output_dir, PREDICTIONS_NAME), names, sizes, settings.batch_size
        )
        records = {name: [r for r in records if r["dataset"] == name] for name in names}
    summary = summarize(records)
    done = sum(len(v) for v in records.values())
    total = sum(sizes.values())
    summary.update(complete=done == total, items_done=done, items_total=total)
    summary["settings"] = {**info, "seconds": round(seconds, 2)}
    if output_dir is not None:
        _write_json(os.path.join(output_dir, SUMMARY_NAME), summary)
    return summary
