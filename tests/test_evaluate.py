"""The LLM-Adapters scorer on crafted responses, the prompt template, and the data checks."""

import json

import pytest

from fastadapters import evaluate
from fastadapters.data import DataError, load_json_dataset, tokenize_example, train_val_split
from fastadapters.evaluate import extract_answer, score
from fastadapters.prompts import generate_prompt, response_of

# (response, label, extracted answer, correct) for the numeric math sets.
NUMERIC_CASES = [
    ("The answer is 576.", "576.0", 576.0, True),
    ("no number here at all", "5.0", None, False),  # no number: wrong
    ("", "0", None, False),
    ("First 3 apples, then 4 more: 3 + 4 = 7. The answer is 7", "7.0", 7.0, True),  # several: the last
    ("The answer is 7. Check: 8", "7.0", 8.0, False),  # the last number wins even when it is not the answer
    ("He earns 1,234,567 dollars.", "1234567.0", 1234567.0, True),  # commas removed
    ("He earns 1,234.5 dollars.", "1234.5", 1234.5, True),
    ("The temperature fell to -12 degrees.", "-12.0", -12.0, True),  # negatives
    ("The temperature fell to -12 degrees.", "12.0", -12.0, False),
    ("5 - 3 = 2", "2.0", 2.0, True),
    ("The answer is 10.6666", "10.666666666666666", 10.6666, True),  # within 0.001
    ("The answer is 10.66", "10.666666666666666", 10.66, False),  # off by 0.0067
    ("The answer is 3.", "3.0", 3.0, True),  # "3." is a number with a trailing dot
    ("Room B12 holds 40 people", "40", 40.0, True),  # digits inside words still count as numbers
    ("Room 40 is B12", "40", 12.0, False),
    ("THE ANSWER IS 9", "9.0", 9.0, True),  # case does not matter for numbers
    ("The answer is 0.5", ".5", 0.5, True),  # labels parse as floats
    ("The answer is 5", "five", 5.0, False),  # an unparsable label is never matched
]


@pytest.mark.parametrize("dataset", evaluate.NUMERIC)
@pytest.mark.parametrize("response,label,answer,correct", NUMERIC_CASES)
def test_numeric(dataset, response, label, answer, correct):
    assert extract_answer(dataset, response) == answer
    assert score(dataset, response, label) is correct


MULTIPLE_CHOICE_CASES = [
    # (response, label, last-letter answer, first-letter answer)
    ("The answer is (D).", "D", "D", "D"),
    ("A car travels 60 km. The answer is (C).", "C", "C", "A"),  # the paper's bug: "A" of "A car"
    ("Between (A) and (E) the answer is B", "B", "B", "B"),  # first letter "B" inside "Between"
    ("Each option fails but (B) works", "B", "B", "E"),  # letters inside words are skipped by default
    ("the answer is b", "B", None, None),  # wrong case: lower-case letters are not answers
    ("no letter here", "A", None, None),
    ("", "A", None, None),
    ("Answer: E) 1023.65", "E", "E", "A"),
    ("Options A, B and C; the answer is A", "A", "A", "A"),
]


@pytest.mark.parametrize("dataset", evaluate.MULTIPLE_CHOICE)
@pytest.mark.parametrize("response,label,last,first", MULTIPLE_CHOICE_CASES)
def test_multiple_choice(dataset, response, label, last, first):
    assert extract_answer(dataset, response) == last
    assert extract_answer(dataset, response, first_letter=True) == first
    assert score(dataset, response, label) is (last == label)
    assert score(dataset, response, label, first_letter=True) is (first == label)


COMMONSENSE_CASES = {
    "boolq": [
        ("the correct answer is true", "true", "true"),
        ("the correct answer is false", "true", "false"),
        ("false, no wait, true", "true", "false"),  # several: the first
        ("The correct answer is True", "true", None),  # wrong case: no match
        ("It is untrue", "true", "true"),  # letters inside words match, as in LLM-Adapters
        ("maybe", "false", None),
        ("", "false", None),
    ],
    "piqa": [
        ("the correct answer is solution2", "solution2", "solution2"),
        ("solution1 or solution2", "solution2", "solution1"),
        ("Solution2", "solution2", None),
        ("the correct answer is 2", "solution2", None),
    ],
    "hellaswag": [
        ("the correct answer is ending4", "ending4", "ending4"),
        ("ending3 then ending4", "ending4", "ending3"),
        ("Ending4", "ending4", None),
        ("ending5", "ending4", None),
    ],
    "winogrande": [
        ("the correct answer is option1", "option1", "option1"),
        ("option2option1", "option1", "option2"),
        ("Option1", "option1", None),
        ("option 1", "option1", None),
    ],
}
for name in ("social_i_qa", "ARC-Easy", "ARC-Challenge", "openbookqa"):
    COMMONSENSE_CASES[name] = [
        ("the correct answer is answer3", "answer3", "answer3"),
        ("the correct answer is answer5", "answer5", "answer5"),
        ("answer2, or answer3", "answer3", "answer2"),
        ("Answer3", "answer3", None),  # wrong case
        ("answer 3", "answer3", None),
        ("myanswer1x", "answer1", "answer1"),  # inside a word: the pattern still matches
        ("", "answer1", None),
    ]


@pytest.mark.parametrize(
    "dataset,response,label,answer", [(d, *case) for d, cases in COMMONSENSE_CASES.items() for case in cases]
)
def test_commonsense(dataset, response, label, answer):
    assert extract_answer(dataset, response) == answer
    assert score(dataset, response, label) is (answer == label)


def test_every_dataset_has_a_rule():
    assert len(evaluate.DATASETS) == 16  # the 14 test sets, mathqa and hellaswag
    assert set(COMMONSENSE_CASES) == set(evaluate.COMMONSENSE)
    for name in evaluate.DATASETS:
        assert evaluate.default_max_new_tokens(name) == (256 if name in evaluate.MATH else 32)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'"):
        score("gsm9k", "1", "1")


def test_prompt_template():
    prompt = generate_prompt("Add 2 and 3.")
    assert prompt == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    with_input = generate_prompt("Add.", "2 and 3", "5")
    assert "\n\n### Input:\n2 and 3\n\n### Response:\n5" in with_input
    assert with_input.startswith("Below is an instruction that describes a task, paired with an input")
    assert all(not line.startswith(" ") for line in with_input.splitlines())  # no stray indentation
    assert response_of(generate_prompt("q", "", " The answer is 5. ")) == "The answer is 5."
    assert response_of("no marker") == "no marker"


class _CharTokenizer:
    """One token per character (ids from 3), BOS 1, EOS 2: enough to check tokenize_example."""

    eos_token_id = 2

    def __call__(self, text, truncation=True, max_length=None, padding=False, return_tensors=None):
        ids = [1] + [3 + (ord(c) % 90) for c in text]
        ids = ids[:max_length]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)}


def test_tokenize_example_labels():
    item = {"instruction": "Add 2 and 3.", "input": "", "output": "5", "answer": "5"}
    tok = _CharTokenizer()
    full = tokenize_example(tok, item, cutoff_len=256, train_on_inputs=True)
    assert full["input_ids"][-1] == 2 and full["labels"] == full["input_ids"]  # EOS appended
    masked = tokenize_example(tok, item, cutoff_len=256, train_on_inputs=False)
    n_prompt = 1 + len(generate_prompt("Add 2 and 3."))
    assert masked["labels"][:n_prompt] == [-100] * n_prompt
    assert masked["labels"][n_prompt:] == masked["input_ids"][n_prompt:] and masked["labels"][-1] == 2
    cut = tokenize_example(tok, item, cutoff_len=20, train_on_inputs=False)
    assert len(cut["input_ids"]) == 20 and cut["input_ids"][-1] != 2  # no room for EOS
    assert cut["labels"] == [-100] * 20


def test_load_json_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_json_dataset(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a"}]))
    with pytest.raises(DataError, match=r"item 0 lacks the field\(s\) \['answer'\]"):
        load_json_dataset(str(bad))
    bad.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_json_dataset(str(bad))
    bad.write_text(json.dumps([{"instruction": "q", "input": "", "output": "a", "answer": 5}]))
    with pytest.raises(DataError, match="non-string"):
        load_json_dataset(str(bad))


def test_train_val_split():
    data = list(range(50))
    train, val = train_val_split(data, 10, seed=42)
    assert len(val) == 10 and sorted(train + val) == data
    assert train_val_split(data, 10, seed=42) == (train, val)
    assert train_val_split(data, 0) == (data, [])
    with pytest.raises(DataError, match="leaves no training data"):
        train_val_split(data, 50)


def test_summary_and_table():
    records = {
        "gsm8k": [{"correct": True}, {"correct": False}],
        "boolq": [{"correct": True}],
    }
    summary = evaluate.summarize(records)
    assert summary["datasets"]["gsm8k"] == {"correct": 1, "total": 2, "accuracy": 0.5}
    assert summary["mean_accuracy"] == pytest.approx(0.75)
    table = evaluate.format_table(summary)
    assert "gsm8k" in table and "50.0%" in table and "75.0%" in table
