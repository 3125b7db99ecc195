"""LLM-Adapters data: JSON lists of {instruction, input, output, answer}, tokenised as finetune.py does.

Token conventions (LLM-Adapters): the padding id is 0 and padding is on the left; EOS is appended when
the text is shorter than cutoff_len; with train_on_inputs=False the prompt's labels are -100.
"""

import json
import os
import random
import tempfile

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
    except OSError as exc:  # unreadable: permissions, a folder, an I/O error
        raise DataError(f"cannot read data file {path}: {exc.strerror or exc}") from None
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


def check_output_dir(path: str, option: str = "--output-dir") -> None:
    """Raises UsageError unless `path` is, or can be created as, a writable folder. Leaves nothing behind.

    An existing folder is probed by creating and deleting a file in it; a missing one by the same probe in
    its nearest existing parent, which must be a folder.
    """
    target = os.path.abspath(path)
    probe_dir = target
    while not os.path.exists(probe_dir):
        parent = os.path.dirname(probe_dir)
        if parent == probe_dir:
            break
        probe_dir = parent
    if not os.path.isdir(probe_dir):
        what = "is a file" if probe_dir == target else f"lies under {probe_dir}, which is not a folder"
        raise UsageError(f"{option} {path} {what}; expected a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastadapters-write-check-", dir=probe_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        where = "" if probe_dir == target else f" (its parent {probe_dir} is not writable)"
        raise UsageError(f"{option} {path} is not writable{where}: {exc.strerror or exc}") from None


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
