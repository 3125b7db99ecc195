"""The alpaca prompt of LLM-Adapters (without the original's stray indentation), and its response part."""

PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
RESPONSE_MARKER = "### Response:"


def generate_prompt(instruction: str, input: str = "", output: str = "") -> str:
    """The training text (with `output`) or the generation prompt (output="") of one example.

    `### Input:` is added only when `input` is non-empty, as in LLM-Adapters' finetune script.
    """
    if input:
        return (
            f"{PREAMBLE_WITH_INPUT}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
            f"{RESPONSE_MARKER}\n{output}"
        )
    return f"{PREAMBLE}\n\n### Instruction:\n{instruction}\n\n{RESPONSE_MARKER}\n{output}"


def response_of(text: str) -> str:
    """The text after the first `### Response:` marker, stripped (the whole text if there is none)."""
    _, marker, rest = text.partition(RESPONSE_MARKER)
    return (rest if marker else text).strip()
