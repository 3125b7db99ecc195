"""The `fastadapters` command: `fastadapters train`, `eval`, `demo`, `serve`, `build-ext`, `backends`,
`--version`.

Bad input (a bad or out-of-range argument, a missing or unreadable file, a malformed dataset, an unknown
name, inconsistent sizes, an unloadable base model, an adapter saved for another base model, an output
folder that cannot be written) prints one line `fastadapters <command>: error: ...` on stderr and exits
with status 2, without a traceback. Ctrl-C stops `train` and `eval` cleanly (a checkpoint, the predictions
so far) and exits with status 130. Other exceptions are bugs and keep their traceback.
"""

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading

from fastadapters.data import UsageError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
# OSErrors about the user's files and folders (their message names the path): reported like UsageError.
FILE_ERRORS = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, `<prog>: error: <message>` (no usage block), with status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


class StopOnInterrupt:
    """While active, the first Ctrl-C (SIGINT) only sets `requested`, so that the work can stop at a safe
    point; a second Ctrl-C raises KeyboardInterrupt at once. Inactive outside the main thread."""

    def __init__(self, what: str):
        self.what = what
        self.requested = False
        self._previous = None

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            f"\ninterrupted: stopping after the current {self.what} (Ctrl-C again to stop now)",
            file=sys.stderr,
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


@contextlib.contextmanager
def _hint_on_interrupt(hint: str):
    """Prints `hint` on stderr when a KeyboardInterrupt (a second Ctrl-C) goes through, then re-raises."""
    try:
        yield
    except KeyboardInterrupt:
        print(hint, file=sys.stderr)
        raise


def _resume_command(argv: list[str], flag: str) -> str:
    words = ["fastadapters", *argv]
    if not any(w == flag or w.startswith(flag + "=") or w == flag.replace("-", "_") for w in argv):
        words.append(flag)
    return " ".join(shlex.quote(w) for w in words)


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
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the evaluation in --output-dir: skip the items already in predictions.jsonl "
        "(the settings must be those in its run.json)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start again even if --output-dir already holds predictions (default: refuse)",
    )
    parser.add_argument(
        "--no-progress",
        "--no_progress",
        dest="progress",
        action="store_false",
        help="no progress bar (it is shown only when stderr is a terminal)",
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
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    settings = evaluate.EvalSettings(
        batch_size=args.batch_size,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        first_letter=args.first_letter,
        extra={"dtype": args.dtype},
    )
    if not os.path.isdir(args.data_dir):
        raise UsageError(f"data directory not found: {args.data_dir}")
    # evaluate.run reads the data and checks the output folder before it loads the model, so bad input
    # fails in a second; it loads the model only if items are left to generate.
    if not args.progress or not sys.stderr.isatty():
        import transformers

        transformers.utils.logging.disable_progress_bar()  # its weight-loading bar, too
    resume_hint = f"resume with: {_resume_command(args.argv, '--resume')}"
    with StopOnInterrupt("batch") as stop, _hint_on_interrupt(resume_hint):
        summary = evaluate.run(
            args.base_model,
            names,
            args.data_dir,
            adapter=args.adapter,
            output_dir=args.output_dir,
            settings=settings,
            dtype=dtype,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=None if args.progress else False,
            should_stop=stop,
        )
    if summary["datasets"]:
        print(evaluate.format_table(summary))
    written = f"{os.path.join(args.output_dir, evaluate.PREDICTIONS_NAME)} and {evaluate.SUMMARY_NAME}"
    if not summary["complete"]:
        print(f"interrupted after {summary['items_done']} of {summary['items_total']} items; wrote {written}")
        print(resume_hint, file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {written}")
    return 0


def _run_train(args) -> int:
    from fastadapters import train

    resume_hint = f"resume with: {_resume_command(args.argv, '--resume-from-checkpoint')}"
    with StopOnInterrupt("step") as stop, _hint_on_interrupt(resume_hint + " (from the last checkpoint)"):
        result = train.run(args, should_stop=stop)
    if result.summary.get("interrupted"):
        print(resume_hint, file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def _run_demo(args) -> int:
    from fastadapters import demo

    demo.main(args)
    return 0


def _run_serve(args) -> int:
    from fastadapters.serving import server

    return server.run(args)


def _run_build_ext(args) -> int:
    from fastadapters import _ext

    if _ext.AVAILABLE:
        print(f"fastadapters._C is already loaded from {_ext.PATH}; nothing to build")
        return 0
    try:
        path = _ext.compile_cpu(verbose=args.verbose, announce=True)
    except RuntimeError as exc:
        print(f"fastadapters build-ext: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    print(f"fastadapters._C (CPU kernels) is compiled in {path}")
    return 0


def _run_backends(args) -> int:
    import torch

    import fastadapters
    from fastadapters import _ext
    from fastadapters.ops import _dispatch

    _ext.jit(build=False)  # an earlier just-in-time build is used; nothing is compiled here
    if _ext.AVAILABLE:
        kernels = "CPU and CUDA kernels" if _ext.has_cuda() else "CPU kernels"
        print(f"fastadapters {fastadapters.__version__}: fastadapters._C ({kernels}) loaded from {_ext.PATH}")
    else:
        print(f"fastadapters {fastadapters.__version__}: fastadapters._C not loaded: {_ext.ERROR}")
    no_gpu = "" if torch.cuda.is_available() else " (no GPU is visible here)"
    print(f"torch {torch.__version__}; backends per op, in the order dispatch tries them:")
    for op, backends in sorted(_dispatch.IMPLEMENTATIONS.items()):
        for device in (torch.device("cpu"), torch.device("cuda")):
            print(f"{op}, {device.type} tensors{no_gpu if device.type == 'cuda' else ''}:")
            chosen = False
            for name in _dispatch.priority(op, device):
                if name not in backends:
                    continue
                why = backends[name].reasons(device=device, dtype=torch.float32)
                if why:
                    print(f"  {name:<7} unavailable: {'; '.join(why)}")
                else:
                    print(f"  {name:<7} available{'' if chosen else ' (chosen)'}")
                    chosen = True
    return 0


def build_parser() -> argparse.ArgumentParser:
    from fastadapters import __version__, demo, train

    parser = ArgumentParser(prog="fastadapters", description="Adapter fine-tuning on fused kernels.")
    parser.add_argument("--version", action="version", version=f"fastadapters {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{train,eval,demo,serve,build-ext,backends}"
    )
    p = sub.add_parser("train", help="fine-tune an adapter on an LLM-Adapters JSON dataset")
    train.add_arguments(p).set_defaults(func=_run_train)
    p = sub.add_parser("eval", help="score a base model or an adapter on the LLM-Adapters test sets")
    _eval_arguments(p).set_defaults(func=_run_eval)
    p = sub.add_parser("demo", help="offline end-to-end demo on a tiny model (about 2 minutes on a CPU)")
    demo.add_arguments(p).set_defaults(func=_run_demo)
    p = sub.add_parser("serve", help="an OpenAI-compatible server for the base model and its adapters")
    _serve_arguments(p).set_defaults(func=_run_serve)
    p = sub.add_parser(
        "build-ext",
        help="compile the C++ extension's CPU kernels now into the per-user cache (else done on first use)",
    )
    p.add_argument("--verbose", action="store_true", help="show the compiler's commands and output")
    p.set_defaults(func=_run_build_ext)
    p = sub.add_parser("backends", help="list, per op, the backends that can run and why the others cannot")
    p.set_defaults(func=_run_backends)
    return parser


def _serve_arguments(parser):
    from fastadapters.serving import server

    return server.add_arguments(parser)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fastadapters` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        print(
            f"fastadapters {args.command}: error: unrecognized arguments: {' '.join(unknown)}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    args.argv = argv
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"fastadapters {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except FILE_ERRORS as exc:
        print(f"fastadapters {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"fastadapters {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
