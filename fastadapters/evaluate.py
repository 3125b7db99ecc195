"""LLM-Adapters evaluation: batched generation on the math and commonsense test sets, and their scorer.

Scoring rules (LLM_ADAPTERS.md):
- numeric math sets: remove commas, take the LAST match of -?\\d+\\.?\\d*; correct when
  |pred - label| <= 0.001.
- multiple choice (AQuA, mathqa): the last stand-alone letter A-E; first_letter=True reproduces the paper
  (the first A-E anywhere, even inside a word such as the "A" of "A car").
- commonsense: the first match of the dataset's answer pattern, equal to the label.
No answer found means wrong.
"""

import json
import math
import os
import re
import time
from dataclasses import dataclass, field

import torch

from fastadapters.data import DataError, UsageError, load_json_dataset, prepare_tokenizer
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


def evaluate_dataset(model, tokenizer, dataset: str, data: list[dict], settings: EvalSettings, progress=None):
    """Prediction records of `data`, generated in batches of settings.batch_size."""
    max_new = settings.max_new_tokens or default_max_new_tokens(dataset)
    records = []
    for start in range(0, len(data), settings.batch_size):
        batch = data[start : start + settings.batch_size]
        prompts = [generate_prompt(item["instruction"], item["input"]) for item in batch]
        responses = generate(model, tokenizer, prompts, max_new, settings.num_beams)
        for i, (item, prompt, response) in enumerate(zip(batch, prompts, responses)):
            answer = extract_answer(dataset, response, settings.first_letter)
            records.append(
                {
                    "dataset": dataset,
                    "index": start + i,
                    "prompt": prompt,
                    "response": response,
                    "answer": answer,
                    "label": item["answer"],
                    "correct": is_correct(dataset, answer, item["answer"]),
                }
            )
        if progress is not None:
            progress(dataset, len(records), len(data))
    return records


def summarize(records_by_dataset: dict[str, list[dict]]) -> dict:
    """{dataset: {correct, total, accuracy}} plus the unweighted mean accuracy over datasets."""
    per = {}
    for name, records in records_by_dataset.items():
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
        except (ValueError, FileNotFoundError) as exc:
            raise UsageError(f"cannot load adapter {adapter} onto {base_model}: {exc}") from None
    model.to(device)
    model.eval()
    return model, tokenizer


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
) -> dict:
    """Evaluates on `datasets`; writes predictions.jsonl and summary.json to output_dir; returns the summary.

    A preloaded (model, tokenizer) may be passed to skip loading base_model/adapter.
    """
    settings = settings or EvalSettings()
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory not found: {data_dir}")
    names = resolve_datasets(datasets, data_dir)
    data = {}
    for name in names:
        items = load_json_dataset(dataset_path(data_dir, name))
        data[name] = items[: settings.limit] if settings.limit is not None else items
    if model is None:
        model, tokenizer = load_model(base_model, adapter)
    else:
        prepare_tokenizer(tokenizer)
        model.eval()
    start = time.perf_counter()
    records = {}
    for name in names:
        records[name] = evaluate_dataset(model, tokenizer, name, data[name], settings)
        acc = sum(r["correct"] for r in records[name]) / max(1, len(records[name]))
        if log:
            log(f"{name}: {100 * acc:.1f}% of {len(records[name])}")
    summary = summarize(records)
    summary["settings"] = {
        "base_model": base_model,
        "adapter": adapter,
        "data_dir": os.path.abspath(data_dir),
        "batch_size": settings.batch_size,
        "num_beams": settings.num_beams,
        "max_new_tokens": {n: settings.max_new_tokens or default_max_new_tokens(n) for n in names},
        "limit": settings.limit,
        "first_letter": settings.first_letter,
        "seconds": round(time.perf_counter() - start, 2),
        **settings.extra,
    }
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "predictions.jsonl"), "w", encoding="utf-8") as f:
            for name in names:
                for r in records[name]:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary
