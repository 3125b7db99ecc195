"""LLM-Adapters data: JSON lists of {instruction, input, output, answer}, tokenised as finetune.py does.

Token conventions (LLM-Adapters): the padding id is 0 and padding is on the left; EOS is appended when
the text is shorter than cutoff_len; with train_on_inputs=False the prompt's labels are -100.
"""

import json
import os
import random

from fastadapters.prompts import generate_prompt

FIELDS = ("instruction", "input", "output", "answer")
PAD_ID = 0
IGNORE_INDEX = -100


class UsageError(Exception):
    """Bad input from the user: the CLI prints the message, without a traceback, and exits with status 2."""


class DataError(UsageError, ValueError):
    """A data file or folder is missing, or not in the LLM-Adapters format."""


def load_json_dataset(path: str) -> list[dict]:
    """The examples of an LLM-Adapters JSON file (a list of {instruction, input, output, answer} strings)."""
    if not os.path.isfile(path):
        raise DataError(f"data file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("train"), list):
        data = data["train"]  # the {"train": [...]} layout of HF's json loader
    if not isinstance(data, list) or not data:
        raise DataError(f"{path} must hold a non-empty JSON list of {{{', '.join(FIELDS)}}} objects")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise DataError(
                f"{path}: item {i} is a {type(item).__name__}, expected an object with {list(FIELDS)}"
            )
        missing = [k for k in FIELDS if k not in item]
        if missing:
            raise DataError(f"{path}: item {i} lacks the field(s) {missing}; every item needs {list(FIELDS)}")
        wrong = [k for k in FIELDS if not isinstance(item[k], str)]
        if wrong:
            raise DataError(f"{path}: item {i} has non-string field(s) {wrong}; expected strings")
    return data


def train_val_split(data: list, val_set_size: int, seed: int = 42) -> tuple[list, list]:
    """(train, val): a seeded shuffle, then the first val_set_size items are the validation set."""
    if val_set_size < 0:
        raise DataError(f"val_set_size must be >= 0, got {val_set_size}")
    if val_set_size == 0:
        return list(data), []
    if val_set_size >= len(data):
        raise DataError(
            f"val_set_size={val_set_size} leaves no training data: the file has {len(data)} items "
            "(use --val-set-size 0 to train on everything)"
        )
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    val = [data[i] for i in order[:val_set_size]]
    train = [data[i] for i in order[val_set_size:]]
    return train, val


def tokenize(tokenizer, text: str, cutoff_len: int, add_eos: bool = True) -> dict:
    """input_ids/attention_mask/labels of `text`, truncated to cutoff_len, EOS appended when it fits."""
    result = tokenizer(text, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
    ids, mask = list(result["input_ids"]), list(result["attention_mask"])
    eos = tokenizer.eos_token_id
    if add_eos and eos is not None and (not ids or ids[-1] != eos) and len(ids) < cutoff_len:
        ids.append(eos)
        mask.append(1)
    return {"input_ids": ids, "attention_mask": mask, "labels": list(ids)}


def tokenize_example(tokenizer, item: dict, cutoff_len: int, train_on_inputs: bool = True) -> dict:
    """One training example; with train_on_inputs=False the prompt's label positions are -100."""
    full = tokenize(
        tokenizer, generate_prompt(item["instruction"], item["input"], item["output"]), cutoff_len
    )
    if not train_on_inputs:
        prompt = tokenize(
            tokenizer, generate_prompt(item["instruction"], item["input"]), cutoff_len, add_eos=False
        )
        n = len(prompt["input_ids"])
        full["labels"] = [IGNORE_INDEX] * n + full["labels"][n:]
        full["labels"] = full["labels"][: len(full["input_ids"])]
    return full


def prepare_tokenizer(tokenizer):
    """Sets LLM-Adapters' conventions on a HF tokenizer: pad id 0, left padding. Returns it."""
    tokenizer.pad_token_id = PAD_ID
    tokenizer.padding_side = "left"
    return tokenizer
