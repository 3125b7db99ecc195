"""LLM-Adapters fine-tuning on fastadapters' kernels: `fastadapters train` / `python -m fastadapters.train`.

Same arguments and defaults as LLM-Adapters' finetune.py (batch 128, micro batch 4, 3 epochs, lr 3e-4,
cutoff 256, 2000 validation items split with seed 42, 100 warmup steps, eval/save every 200 steps,
train_on_inputs=True). Under torchrun or `accelerate launch` the HF Trainer runs DDP; only adapter
parameters require grad, so DDP reduces only their gradients. The result holds the adapter alone
(fastadapters.save), never the base weights. Checkpoints (`checkpoint-N/`) hold the adapter plus what an
exact resume needs: the optimizer and scheduler states (of the adapter parameters only), the RNG states
and the trainer state (step, epoch: the data order follows from the seed and the epoch).
`--resume-from-checkpoint [PATH|latest]` continues from one; stopping early (see `run(should_stop=)`,
which the CLI wires to Ctrl-C) saves a checkpoint first.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from fastadapters.config import (
    BottleneckConfig,
    LoraConfig,
    PrefixConfig,
    PromptTuningConfig,
    PTuningConfig,
    config_to_dict,
)
from fastadapters.data import (
    UsageError,
    check_output_dir,
    load_json_dataset,
    prepare_tokenizer,
    tokenize_example,
    train_val_split,
)

ADAPTERS = ("lora", "series", "adapterp", "parallel", "prefix", "prompt-tuning", "p-tuning")
SUMMARY_NAME = "train_summary.json"
TRAINER_STATE_NAME = "trainer_state.json"  # what makes a checkpoint folder resumable (HF Trainer's name)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def parse_bool(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_scaling(text: str):
    if text == "learned":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'learned', got {text!r}") from None


def _opt(parser, name: str, **kwargs):
    """Adds --name-with-dashes and its LLM-Adapters spelling --name_with_underscores."""
    dashed = "--" + name.replace("_", "-")
    spellings = [dashed] + (["--" + name] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)


def _flag(parser, name: str, default: bool, help: str):
    """A boolean option: --name, --name true|false, --no-name."""
    _opt(parser, name, type=parse_bool, nargs="?", const=True, default=default, metavar="BOOL", help=help)
    parser.add_argument(
        "--no-" + name.replace("_", "-"), dest=name, action="store_false", help=argparse.SUPPRESS
    )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The finetune arguments of LLM-Adapters (dashes or underscores), with its defaults."""
    g = parser.add_argument_group("model and data")
    _opt(g, "base_model", required=True, help="local folder or hub name of a causal LM")
    _opt(g, "data_path", required=True, help="JSON list of {instruction, input, output, answer}")
    _opt(g, "output_dir", default="./fastadapters-adapter", help="where the adapter is written")
    _opt(g, "adapter", default="lora", help=f"one of {', '.join(ADAPTERS)} (default lora)")
    g = parser.add_argument_group("training")
    _opt(g, "batch_size", type=int, default=128, help="examples per optimizer step, all processes (128)")
    _opt(g, "micro_batch_size", type=int, default=4, help="examples per forward pass and process (4)")
    _opt(g, "num_epochs", type=float, default=3, help="(3)")
    _opt(g, "learning_rate", type=float, default=3e-4, help="(3e-4)")
    _opt(g, "cutoff_len", type=int, default=256, help="tokens per example after truncation (256)")
    _opt(g, "val_set_size", type=int, default=2000, help="held-out items, split with the seed 42 (2000)")
    _opt(g, "warmup_steps", type=int, default=100, help="(100)")
    _opt(g, "eval_step", type=int, default=200, help="evaluate every N steps (200)")
    _opt(g, "save_step", type=int, default=200, help="checkpoint every N steps (200)")
    _opt(g, "logging_steps", type=int, default=10, help="(10)")
    _opt(g, "max_steps", type=int, default=-1, help="stop after N optimizer steps (-1: run num_epochs)")
    _flag(g, "train_on_inputs", True, "compute the loss on the prompt too (true)")
    _flag(g, "group_by_length", False, "batch examples of similar length (false)")
    _flag(g, "gradient_checkpointing", False, "recompute activations in backward (false)")
    _opt(
        g,
        "precision",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="mixed precision: auto = fp16 on a CUDA GPU (as LLM-Adapters), fp32 on the CPU",
    )
    _opt(g, "fsdp", default="", help="passed to TrainingArguments.fsdp, e.g. 'full_shard auto_wrap' (GPU)")
    _opt(g, "seed", type=int, default=42, help="(42)")
    _opt(
        g,
        "resume_from_checkpoint",
        nargs="?",
        const="latest",
        default=None,
        metavar="PATH|latest",
        help="continue from a checkpoint-N folder (latest: the newest in --output-dir), with its optimizer, "
        "scheduler, RNG and data position; a folder holding only an adapter starts from its weights",
    )
    _flag(g, "progress", True, "show the progress bar (true)")
    g = parser.add_argument_group("LoRA")
    _opt(g, "lora_r", type=int, default=8, help="(8)")
    _opt(g, "lora_alpha", type=float, default=16, help="(16)")
    _opt(g, "lora_dropout", type=float, default=0.05, help="(0.05)")
    g.add_argument(
        "--target-modules",
        "--target_modules",
        "--lora-target-modules",
        "--lora_target_modules",
        dest="target_modules",
        default=None,
        help="comma-separated module names (default: the family's LLM-Adapters default for the adapter)",
    )
    g = parser.add_argument_group("bottleneck adapters (series, adapterp, parallel)")
    _opt(g, "bottleneck_size", type=int, default=256, help="(256)")
    _opt(g, "non_linearity", default="tanh", help="tanh, relu, gelu or silu (tanh)")
    _opt(g, "adapter_dropout", type=float, default=0.0, help="(0.0)")
    _opt(g, "scaling", type=parse_scaling, default=1.0, help="a number or 'learned' (1.0)")
    g = parser.add_argument_group("prefix, prompt tuning and P-tuning")
    _opt(g, "num_virtual_tokens", type=int, default=30, help="(30)")
    return parser


def adapter_config(args):
    """The fastadapters config for args.adapter and its options (invalid values raise UsageError)."""
    targets = args.target_modules
    builders = {
        "lora": lambda: LoraConfig(
            r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=targets
        ),
        "series": lambda: _bottleneck(args),
        "adapterp": lambda: _bottleneck(args, use_adapterp=True),
        "parallel": lambda: _bottleneck(args, use_parallel_adapter=True),
        "prefix": lambda: PrefixConfig(num_virtual_tokens=args.num_virtual_tokens),
        "prompt-tuning": lambda: PromptTuningConfig(num_virtual_tokens=args.num_virtual_tokens),
        "p-tuning": lambda: PTuningConfig(num_virtual_tokens=args.num_virtual_tokens),
    }
    if args.adapter not in builders:
        raise UsageError(f"unknown adapter {args.adapter!r}; expected one of {', '.join(ADAPTERS)}")
    try:
        return builders[args.adapter]()
    except (ValueError, TypeError) as exc:
        raise UsageError(f"invalid {args.adapter} options: {exc}") from None


def _bottleneck(args, **kind) -> BottleneckConfig:
    return BottleneckConfig(
        bottleneck_size=args.bottleneck_size,
        non_linearity=args.non_linearity,
        adapter_dropout=args.adapter_dropout,
        scaling=args.scaling,
        target_modules=args.target_modules,
        **kind,
    )


def check_args(args) -> None:
    """Raises UsageError for values the finetune script cannot run with."""
    if args.adapter not in ADAPTERS:
        raise UsageError(f"unknown adapter {args.adapter!r}; expected one of {', '.join(ADAPTERS)}")
    for name in ("batch_size", "micro_batch_size", "cutoff_len", "eval_step", "save_step", "logging_steps"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.micro_batch_size > args.batch_size:
        raise UsageError(
            f"--micro-batch-size ({args.micro_batch_size}) must not exceed --batch-size ({args.batch_size})"
        )
    for name in ("num_epochs", "learning_rate", "lora_alpha", "lora_dropout", "adapter_dropout", "scaling"):
        value = getattr(args, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    if args.max_steps == 0 or args.max_steps < -1:
        raise UsageError(f"--max-steps must be >= 1, or -1 to train for --num-epochs; got {args.max_steps}")
    if args.num_epochs <= 0 and args.max_steps <= 0:
        raise UsageError(f"--num-epochs must be > 0, got {args.num_epochs}")
    if args.learning_rate <= 0:
        raise UsageError(f"--learning-rate must be > 0, got {args.learning_rate}")
    if args.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {args.seed}")
    if args.val_set_size < 0:
        raise UsageError(f"--val-set-size must be >= 0, got {args.val_set_size}")
    if args.fsdp:
        from transformers.trainer_utils import FSDPOption

        known = [o.value for o in FSDPOption]
        unknown = [w for w in str(args.fsdp).split() if w not in known]
        if unknown:
            raise UsageError(f"--fsdp: unknown option(s) {unknown}; expected words from {known}")
    if args.precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--precision fp16 needs a CUDA GPU; use fp32 or bf16 on the CPU")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def gradient_accumulation_steps(batch_size: int, micro_batch_size: int, world: int) -> int:
    """batch/micro, divided by the world size under DDP (LLM-Adapters), at least 1."""
    steps = batch_size // micro_batch_size
    if world > 1:
        steps //= world
    return max(1, steps)


def resolve_precision(precision: str) -> str:
    if precision == "auto":
        return "fp16" if torch.cuda.is_available() else "fp32"
    return precision


def _looks_like_path(name: str) -> bool:
    """A hub name is 'name' or 'org/name'; anything else is meant as a local folder."""
    return (
        name.startswith((".", "/", "~")) or name.strip("/").count("/") > 1 or os.sep != "/" and os.sep in name
    )


def check_base_folder(base_model: str) -> None:
    """Raises UsageError for a local base-model folder that cannot be loaded: no config.json, a model_type
    this transformers does not know, or weights that are only pickles (which fastadapters never loads)."""
    from transformers import CONFIG_MAPPING, __version__

    config_path = os.path.join(base_model, "config.json")
    if not os.path.isfile(config_path):
        raise UsageError(f"base model folder {base_model} has no config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read {config_path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config_path} is not valid JSON: {exc}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UsageError(
            f"{config_path}: model_type {model_type!r} is not a model type transformers {__version__} knows"
        )
    try:
        files = os.listdir(base_model)
    except OSError as exc:
        raise UsageError(f"cannot list base model folder {base_model}: {exc.strerror or exc}") from None
    pickles = sorted(f for f in files if f.endswith(PICKLE_SUFFIXES))
    if pickles and not any(
        f.endswith(".safetensors") or f.endswith(".safetensors.index.json") for f in files
    ):
        raise UsageError(
            f"base model folder {base_model} holds its weights only as pickles ({', '.join(pickles[:3])}); "
            "fastadapters loads safetensors only: convert them first (save_pretrained writes safetensors)"
        )


def load_base(base_model: str, dtype: torch.dtype):
    """(model, tokenizer) from a local folder or a hub name, safetensors weights only.

    A missing or unloadable folder (see check_base_folder) or a hub name that does not load is a UsageError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if os.path.isdir(base_model):
        check_base_folder(base_model)
    elif _looks_like_path(base_model):
        raise UsageError(f"base model folder not found: {base_model}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model = AutoModelForCausalLM.from_pretrained(base_model, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load base model {base_model!r}: {first}") from None
    return model, prepare_tokenizer(tokenizer)


def _trainer_class():
    from transformers import Trainer

    from fastadapters import io

    class AdapterTrainer(Trainer):
        """Checkpoints hold the adapter only; the best checkpoint is reloaded into the adapter."""

        def _save(self, output_dir=None, state_dict=None):
            output_dir = output_dir if output_dir is not None else self.args.output_dir
            if not self.args.should_save:
                return
            io.save(self.model, output_dir)
            if state_dict is not None:  # FSDP: the gathered full state dict holds the real values
                names = [n for n, _ in io.adapter_named_parameters(self.model)]
                gathered = {n: state_dict[n].detach().contiguous().cpu() for n in names if n in state_dict}
                if len(gathered) == len(names):
                    from safetensors.torch import save_file

                    save_file(gathered, os.path.join(output_dir, io.WEIGHTS_NAME))

        def _load_best_model(self):
            path = self.state.best_model_checkpoint
            state = io.read_weights(os.path.join(path, io.WEIGHTS_NAME))
            io.load_adapter_state(self.model, {k: v.to(self.args.device) for k, v in state.items()}, path)

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # run() loaded the checkpoint's adapter into the unwrapped model before the Trainer was built
            # (load_checkpoint_adapter); the Trainer restores the optimizer, scheduler, RNG and step itself.
            if not os.path.isfile(os.path.join(resume_from_checkpoint, io.WEIGHTS_NAME)):
                raise UsageError(f"{resume_from_checkpoint} holds no {io.WEIGHTS_NAME}")

    return AdapterTrainer


def _stop_callback(should_stop):
    """A TrainerCallback that, once should_stop() is true (on any process), saves a checkpoint and stops."""
    from transformers import TrainerCallback

    class StopCallback(TrainerCallback):
        stopped_at = None

        def on_step_end(self, args, state, control, **kwargs):
            stop = bool(should_stop())
            if world_size() > 1 and torch.distributed.is_initialized():
                # Every process must stop at the same step, or the others would wait in a collective forever.
                flag = torch.tensor([float(stop)], device=args.device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stop = bool(flag.item())
            if stop:
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopCallback()


def find_checkpoint(resume_from_checkpoint: str, output_dir: str) -> str:
    """The checkpoint folder to resume from: PATH itself, or for 'latest' the newest checkpoint-N folder in
    output_dir. Raises UsageError when there is none, or when the folder holds no fastadapters adapter."""
    from transformers.trainer_utils import get_last_checkpoint

    from fastadapters import io

    if resume_from_checkpoint == "latest":
        path = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
        if path is None:
            raise UsageError(f"--resume-from-checkpoint latest: no checkpoint-N folder in {output_dir}")
        return path
    if not os.path.isdir(resume_from_checkpoint):
        raise UsageError(f"--resume-from-checkpoint: folder not found: {resume_from_checkpoint}")
    for name in (io.CONFIG_NAME, io.WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(resume_from_checkpoint, name)):
            raise UsageError(
                f"--resume-from-checkpoint: {resume_from_checkpoint} holds no {name}; expected a "
                "checkpoint-N folder written by fastadapters train, or a fastadapters adapter folder"
            )
    return resume_from_checkpoint


def load_checkpoint_adapter(model, config, path: str) -> None:
    """Copies the adapter weights of checkpoint `path` into `model` (patched with `config`).

    Raises UsageError when the checkpoint's adapter config or base model differs from this run's.
    """
    from fastadapters import io

    try:
        saved, state, base = io.read_adapter(path)
        io.check_base(model, base, path)
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot resume from {path}: {exc}") from None
    ours, theirs = io.saved_config(model), config_to_dict(saved)
    differ = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
    if differ:
        detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r}, now {ours.get(k)!r}" for k in differ)
        raise UsageError(f"cannot resume from {path}: its adapter settings differ ({detail})")
    try:
        io.load_adapter_state(model, state, path)
    except ValueError as exc:
        raise UsageError(f"cannot resume from {path}: {exc}") from None


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    trainer: object
    summary: dict


def _training_arguments(args, precision: str, accumulation: int, has_val: bool):
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    world = world_size()
    cuda = torch.cuda.is_available()
    kwargs = dict(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        warmup_steps=args.warmup_steps,
        num_train_epochs=args.num_epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        logging_steps=args.logging_steps,
        optim="adamw_torch",
        eval_strategy="steps" if has_val else "no",
        save_strategy="steps",
        eval_steps=args.eval_step if has_val else None,
        save_steps=args.save_step,
        save_total_limit=3,
        load_best_model_at_end=has_val,
        # Every adapter parameter takes part in every step, and frozen ones have requires_grad=False, so
        # DDP needs no search for unused parameters (which would also break gradient checkpointing).
        ddp_find_unused_parameters=False if world > 1 else None,
        ddp_backend=None if cuda else ("gloo" if world > 1 else None),
        use_cpu=not cuda,
        report_to="none",
        disable_tqdm=not args.progress,
        seed=args.seed,
        dataloader_num_workers=0,
        # Checkpoints keep the optimizer, scheduler and RNG states for an exact resume. The model part of a
        # checkpoint is AdapterTrainer._save's adapter, and the optimizer holds adapter parameters only.
        save_only_model=False,
    )
    # transformers renamed gradient_checkpointing to activation_checkpointing (5.2x); use what this one has.
    ckpt = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs[ckpt] = args.gradient_checkpointing
    kwargs[f"{ckpt}_kwargs"] = {"use_reentrant": False} if args.gradient_checkpointing else None
    if "train_sampling_strategy" in names:
        kwargs["train_sampling_strategy"] = "group_by_length" if args.group_by_length else "random"
    else:
        kwargs["group_by_length"] = args.group_by_length
    if args.fsdp:
        kwargs["fsdp"] = args.fsdp
        # Frozen base and trainable adapter parameters share FSDP units: keep the original parameters.
        kwargs["fsdp_config"] = {"use_orig_params": True}
    return TrainingArguments(**kwargs)


def run(args, verbose: bool = True, should_stop=None, callbacks=()) -> TrainResult:
    """Fine-tunes args.adapter on args.data_path; rank 0 writes the adapter and train_summary.json.

    verbose=False prints nothing (no parameter line, no loss logs, no final line). `should_stop`, a callable
    polled after every optimizer step, ends the run early once it returns True: a checkpoint of that step is
    saved (resume it with args.resume_from_checkpoint), no final adapter is written, and the result's
    summary is {"interrupted": True, "steps", "checkpoint"}. `callbacks` are extra HF TrainerCallbacks.
    """
    import transformers

    import fastadapters

    check_args(args)
    config = adapter_config(args)
    data = load_json_dataset(args.data_path)
    train_items, val_items = train_val_split(data, args.val_set_size, seed=42)
    check_output_dir(args.output_dir)
    resume = getattr(args, "resume_from_checkpoint", None)
    checkpoint = find_checkpoint(resume, args.output_dir) if resume else None
    precision = resolve_precision(args.precision)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
    transformers.set_seed(args.seed)
    model, tokenizer = load_base(args.base_model, dtype)
    try:
        fastadapters.apply(model, config)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"cannot apply the {args.adapter} adapter to {args.base_model}: {exc}") from None
    # Mixed precision keeps master weights in fp32: upcast any half-precision adapter parameter.
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    model.config.use_cache = False
    trainable, total = fastadapters.trainable_parameters(model)
    resumable = checkpoint is not None and os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME))
    if checkpoint is not None:
        load_checkpoint_adapter(model, config, checkpoint)

    train_set = [tokenize_example(tokenizer, x, args.cutoff_len, args.train_on_inputs) for x in train_items]
    val_set = [tokenize_example(tokenizer, x, args.cutoff_len, args.train_on_inputs) for x in val_items]
    world = world_size()
    accumulation = gradient_accumulation_steps(args.batch_size, args.micro_batch_size, world)
    training_args = _training_arguments(args, precision, accumulation, bool(val_set))
    collator = transformers.DataCollatorForSeq2Seq(
        tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True
    )
    stopper = _stop_callback(should_stop) if should_stop is not None else None
    trainer = _trainer_class()(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=val_set or None,
        data_collator=collator,
        callbacks=[*callbacks, *([stopper] if stopper else [])],
    )
    main_process = trainer.is_world_process_zero()
    if not verbose:
        from transformers import PrinterCallback, ProgressCallback

        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    if main_process and verbose:
        print(
            f"trainable params: {trainable:,} || all params: {total:,} "
            f"|| trainable%: {100 * trainable / total:.4f}"
        )
    if checkpoint is not None and main_process and verbose:
        if resumable:
            print(f"resuming from {checkpoint}")
        else:
            print(f"{checkpoint} is an adapter without trainer state: starting from its weights at step 0")
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint if resumable else None)
    seconds = time.perf_counter() - start
    if (
        stopper is not None
        and stopper.stopped_at is not None
        and stopper.stopped_at < trainer.state.max_steps
    ):
        step = stopper.stopped_at
        saved = os.path.join(args.output_dir, f"checkpoint-{step}")
        summary = {"interrupted": True, "steps": step, "checkpoint": saved}
        if main_process and verbose:
            print(f"stopped at step {step}; checkpoint saved to {saved}")
        return TrainResult(model, tokenizer, trainer, summary)
    eval_loss = trainer.evaluate()["eval_loss"] if val_set else None
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "adapter": args.adapter,
        "config": config_to_dict(config),
        "base_model": args.base_model,
        "data_path": os.path.abspath(args.data_path),
        "train_examples": len(train_set),
        "val_examples": len(val_set),
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        "seconds": round(seconds, 2),
        "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_loss_mean": result.training_loss,
        "train_loss_final": logged[-1] if logged else result.training_loss,
        "eval_loss": eval_loss,
        "world_size": world,
        "micro_batch_size": args.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "effective_batch_size": args.micro_batch_size * accumulation * world,
        "precision": precision,
        "device": str(training_args.device),
        "args": {k: v for k, v in vars(args).items() if k != "func"},
    }
    if trainer.is_fsdp_enabled:
        trainer.save_model(args.output_dir)  # gathers the shards; rank 0 writes the adapter
    elif main_process:
        fastadapters.save(model, args.output_dir)
    if main_process:
        with open(os.path.join(args.output_dir, SUMMARY_NAME), "w") as f:
            json.dump(summary, f, indent=2)
    if main_process and verbose:
        print(
            f"saved {args.adapter} adapter to {args.output_dir} "
            f"({trainer.state.global_step} steps, {seconds:.1f} s, "
            f"final train loss {summary['train_loss_final']:.4f}"
            + (f", eval loss {eval_loss:.4f})" if eval_loss is not None else ")")
        )
    return TrainResult(model, tokenizer, trainer, summary)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastadapters train", description=__doc__.split("\n")[0])
    return add_arguments(parser)


if __name__ == "__main__":
    from fastadapters.cli import main

    sys.exit(main(["train", *sys.argv[1:]]))
