"""The `fastadapters` command: `fastadapters train`, `fastadapters eval`, `fastadapters demo`.

Bad input (a missing file, a malformed dataset, an unknown name, inconsistent sizes, an adapter saved
for another base model) prints one line on stderr and exits with status 2, without a traceback.
"""

import argparse
import os
import sys

from fastadapters.data import UsageError

EXIT_USAGE = 2


def _eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from fastadapters.evaluate import DATA_DIR_ENV, DATASETS

    parser.add_argument(
        "--base-model",
        "--base_model",
        dest="base_model",
        required=True,
        help="local folder or hub name of a causal LM",
    )
    parser.add_argument(
        "--adapter",
        default=None,
        help="adapter folder (fastadapters or PEFT LoRA format); omit to score the bare base",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        required=True,
        help=f"one of {', '.join(DATASETS)}, or all; repeat or separate with commas",
    )
    parser.add_argument(
        "--data-dir",
        "--data_dir",
        dest="data_dir",
        default=os.environ.get(DATA_DIR_ENV),
        help=f"folder holding <dataset>/test.json (default: ${DATA_DIR_ENV})",
    )
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=8, help="(8)")
    parser.add_argument("--num-beams", "--num_beams", dest="num_beams", type=int, default=4, help="(4)")
    parser.add_argument(
        "--max-new-tokens",
        "--max_new_tokens",
        dest="max_new_tokens",
        type=int,
        default=None,
        help="(256 for math, 32 for commonsense)",
    )
    parser.add_argument(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        default="./fastadapters-eval",
        help="where predictions.jsonl and summary.json go",
    )
    parser.add_argument("--limit", type=int, default=None, help="score only the first N items of each set")
    parser.add_argument(
        "--first-letter",
        "--first_letter",
        dest="first_letter",
        action="store_true",
        help="AQuA/mathqa: take the first letter A-E, as the paper did (default: the last)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="base weights: auto = float16 on a GPU, float32 on the CPU",
    )
    return parser


def _run_eval(args) -> int:
    import torch

    from fastadapters import evaluate

    names = [n.strip() for arg in args.dataset for n in arg.split(",") if n.strip()]
    for name in names:
        if name != "all" and name not in evaluate.DATASETS:
            raise UsageError(
                f"unknown dataset {name!r}; expected one of {', '.join(evaluate.DATASETS)} or all"
            )
    if not args.data_dir:
        raise UsageError(
            f"--data-dir is required (or set {evaluate.DATA_DIR_ENV}): the folder of <dataset>/test.json"
        )
    for name in ("batch_size", "num_beams"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be >= 1, got {args.limit}")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    settings = evaluate.EvalSettings(
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        first_letter=args.first_letter,
    )
    # Check the data before loading a model, so bad input fails in a second.
    if not os.path.isdir(args.data_dir):
        raise UsageError(f"data directory not found: {args.data_dir}")
    for name in evaluate.resolve_datasets(names, args.data_dir):
        evaluate.load_json_dataset(evaluate.dataset_path(args.data_dir, name))
    model, tokenizer = evaluate.load_model(args.base_model, args.adapter, dtype=dtype)
    summary = evaluate.run(
        args.base_model,
        names,
        args.data_dir,
        adapter=args.adapter,
        output_dir=args.output_dir,
        settings=settings,
        model=model,
        tokenizer=tokenizer,
    )
    print(evaluate.format_table(summary))
    print(f"wrote {os.path.join(args.output_dir, 'predictions.jsonl')} and summary.json")
    return 0


def _run_train(args) -> int:
    from fastadapters import train

    train.run(args)
    return 0


def _run_demo(args) -> int:
    from fastadapters import demo

    demo.main(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fastadapters import demo, train

    parser = argparse.ArgumentParser(prog="fastadapters", description="Adapter fine-tuning on fused kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,demo}")
    p = sub.add_parser("train", help="fine-tune an adapter on an LLM-Adapters JSON dataset")
    train.add_arguments(p).set_defaults(func=_run_train)
    p = sub.add_parser("eval", help="score a base model or an adapter on the LLM-Adapters test sets")
    _eval_arguments(p).set_defaults(func=_run_eval)
    p = sub.add_parser("demo", help="offline end-to-end demo on a tiny model (about 2 minutes on a CPU)")
    demo.add_arguments(p).set_defaults(func=_run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastadapters` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"fastadapters {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
