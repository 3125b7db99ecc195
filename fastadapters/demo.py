"""`fastadapters demo` (what `make demo` runs): the whole LLM-Adapters pipeline on a tiny model, offline.

It builds a small Llama-style model from a config and a byte-level BPE tokenizer trained on the spot,
writes a synthetic arithmetic dataset in the LLM-Adapters JSON format, scores the bare model, trains a
LoRA and a bottleneck adapter with `fastadapters.train`, scores each with `fastadapters.evaluate` (the
real scorer), prints the trainable-parameter table, and ends with a fastadapters-vs-PEFT training
step-time and memory comparison measured in the same run.
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import warnings

import torch

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0 (also the padding id), 1 (BOS), 2 (EOS)


def build_tokenizer(texts, vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on `texts` with `tokenizers`; digits are single tokens.

    Ids: 0 <unk> (the padding id), 1 <s> (prepended as BOS), 2 </s> (EOS). Returns a PreTrainedTokenizerFast.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def build_model(
    vocab_size: int, hidden: int = 128, layers: int = 2, heads: int = 4, seed: int = 0, init_std: float = 0.1
):
    """A randomly initialised Llama-style causal LM (ids: pad 0, BOS 1, EOS 2).

    init_std is larger than Llama's 0.02 so that the frozen random output layer can express confident
    predictions at all (its logits scale with it); adapters cannot change the output layer.
    """
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    return transformers.LlamaForCausalLM(config)


def save_base_model(
    directory: str, texts, hidden: int = 128, layers: int = 2, vocab_size: int = 512, seed: int = 0
):
    """Writes a tiny random Llama and a tokenizer trained on `texts` to `directory` (from_pretrained-able)."""
    tokenizer = build_tokenizer(texts, vocab_size)
    model = build_model(len(tokenizer), hidden=hidden, layers=layers, seed=seed)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def arithmetic_dataset(n: int, seed: int, max_operand: int = 9) -> list[dict]:
    """n LLM-Adapters items "What is a + b?" / "a - b", with the answer "The answer is X." as in math_data."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        op = rng.choice("+-")
        result = a + b if op == "+" else a - b
        items.append(
            {
                "instruction": f"What is {a} {op} {b}?",
                "input": "",
                "output": f"The answer is {result}.",
                "answer": f"{float(result)}",
            }
        )
    return items


ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
ADAPTER_OPTIONS = {  # the demo trains these two, in this order
    "lora": "--lora-r 32 --lora-alpha 64 --lora-dropout 0.0".split() + ["--target-modules", ALL_PROJECTIONS],
    "parallel": "--bottleneck-size 32 --non-linearity tanh".split() + ["--target-modules", ALL_PROJECTIONS],
}


def _train_args(base: str, data: str, out: str, adapter: str, opts) -> argparse.Namespace:
    from fastadapters import train

    argv = [
        "--base-model", base, "--data-path", data, "--output-dir", out, "--adapter", adapter,
        "--batch-size", str(opts.batch_size), "--micro-batch-size", str(opts.batch_size),
        "--max-steps", str(opts.steps), "--learning-rate", str(opts.learning_rate), "--cutoff-len", "64",
        "--val-set-size", "0", "--warmup-steps", "10", "--logging-steps", "50",
        "--save-step", str(10 * opts.steps), "--train-on-inputs", "false", "--no-progress",
    ]  # fmt: skip
    return train.build_parser().parse_args(argv + ADAPTER_OPTIONS[adapter])


def _evaluate(base: str, adapter, data_dir: str, out: str, opts) -> dict:
    from fastadapters import evaluate

    model, tokenizer = evaluate.load_model(base, adapter, dtype=torch.float32, device="cpu")
    settings = evaluate.EvalSettings(batch_size=50, num_beams=opts.num_beams, max_new_tokens=10)
    summary = evaluate.run(
        base, ["AddSub"], data_dir, adapter=adapter, output_dir=out, settings=settings,
        model=model, tokenizer=tokenizer, log=None,
    )  # fmt: skip
    return summary["datasets"]["AddSub"]


def _step_stats(model, batch, steps: int, warmup: int = 2) -> tuple[float, int, float]:
    """(median seconds per training step, bytes saved for backward, peak CUDA bytes or nan)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    saved: dict[int, int] = {}
    frozen = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in frozen:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    opt.zero_grad(set_to_none=True)
    cuda = batch["input_ids"].is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    return statistics.median(times), sum(saved.values()), peak


def compare_with_peft(base: str, items: list[dict], opts) -> dict:
    """Training-step time and memory of the same LoRA on the same model and batch: PEFT vs fastadapters.

    Returns {"shape": (batch, length), "peft": stats, "fastadapters": stats}, stats as `_step_stats`.
    """
    import peft
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fastadapters
    from fastadapters.data import prepare_tokenizer, tokenize_example

    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(base))
    examples = [tokenize_example(tokenizer, x, 64) for x in items[: opts.batch_size]]
    width = max(len(e["input_ids"]) for e in examples)

    def pad(seq, value):
        return [value] * (width - len(seq)) + seq

    batch = {
        k: torch.tensor([pad(e[k], -100 if k == "labels" else 0) for e in examples]) for k in examples[0]
    }
    targets = ALL_PROJECTIONS.split(",")
    results = {"shape": tuple(batch["input_ids"].shape)}
    for name in ("peft", "fastadapters"):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft calls deprecated transformers helpers
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            if name == "peft":
                cfg = peft.LoraConfig(
                    r=32, lora_alpha=64, lora_dropout=0.05, target_modules=targets, task_type="CAUSAL_LM"
                )
                model = peft.get_peft_model(model, cfg)
            else:
                cfg = fastadapters.LoraConfig(r=32, lora_alpha=64, lora_dropout=0.05, target_modules=targets)
                fastadapters.apply(model, cfg)
            results[name] = _step_stats(model, batch, opts.bench_steps)
    return results


def backends() -> str:
    """Which backend the fused LoRA and bottleneck ops take for this demo's fp32 CPU tensors."""
    from fastadapters.ops import backend_for

    lora_name = backend_for("lora_linear", "cpu", torch.float32)
    bottleneck_name = backend_for("bottleneck_adapter", "cpu", torch.float32, bottleneck=32, dropout_p=0.0)
    label = {"cpu": "cpu (C++ extension)", "torch": "torch (autograd.Function)"}
    return (
        f"fused LoRA op on the {label.get(lora_name, lora_name)} backend, "
        f"bottleneck op on the {label.get(bottleneck_name, bottleneck_name)} backend"
    )


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per adapter (400)")
    parser.add_argument("--batch-size", type=int, default=16, help="(16)")
    parser.add_argument("--learning-rate", type=float, default=5e-3, help="(5e-3)")
    parser.add_argument("--max-operand", type=int, default=4, help="operands are 0..N (4)")
    parser.add_argument("--train-size", type=int, default=2000, help="synthetic training items (2000)")
    parser.add_argument("--test-size", type=int, default=100, help="synthetic test items (100)")
    parser.add_argument("--num-beams", type=int, default=4, help="(4, as LLM-Adapters)")
    parser.add_argument("--bench-steps", type=int, default=10, help="timed steps per provider (10)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    parser.add_argument(
        "--workdir", default=None, help="keep the model, data and adapters here (default: a temp dir)"
    )
    return parser


def _quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(opts) -> None:
    """Runs the demo and prints its report."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_transformers()
    # The demo's matrices are tiny: extra threads only add synchronisation, and on a busy machine
    # (CI running tests beside it) they cost 10x. One thread makes the run time predictable.
    threads = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    try:
        _run(opts)
    finally:
        torch.set_num_threads(threads)


def _run(opts) -> None:
    from fastadapters import train
    from fastadapters.prompts import generate_prompt

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastadapters-demo-") as tmp:
        work = opts.workdir or tmp
        os.makedirs(work, exist_ok=True)
        train_items = arithmetic_dataset(opts.train_size, seed=1, max_operand=opts.max_operand)
        test_items = arithmetic_dataset(opts.test_size, seed=2, max_operand=opts.max_operand)
        data_path = os.path.join(work, "arithmetic_train.json")
        data_dir = os.path.join(work, "data")
        os.makedirs(os.path.join(data_dir, "AddSub"), exist_ok=True)
        with open(data_path, "w") as f:
            json.dump(train_items, f)
        with open(os.path.join(data_dir, "AddSub", "test.json"), "w") as f:
            json.dump(test_items, f)
        base = os.path.join(work, "base")
        corpus = [generate_prompt(x["instruction"], x["input"], x["output"]) for x in train_items[:500]]
        save_base_model(base, corpus, hidden=64, layers=2, vocab_size=400)
        n_problems = 2 * (opts.max_operand + 1) ** 2
        print(
            "fastadapters demo: a random Llama-style model (hidden 64, 2 layers) and a BPE tokenizer built "
            f"here;\n{opts.train_size} synthetic training items 'What is a ± b?' "
            f"(a, b in 0..{opts.max_operand}: {n_problems} distinct problems),\n{opts.test_size} test items "
            "drawn again from them, scored by the AddSub rule of fastadapters.evaluate;\n"
            f"{backends()}"
        )
        before = _evaluate(base, None, data_dir, os.path.join(work, "eval-base"), opts)
        print(
            f"accuracy before training: {100 * before['accuracy']:.1f}% "
            f"({before['correct']}/{before['total']})"
        )
        rows = []
        for adapter in ADAPTER_OPTIONS:
            out = os.path.join(work, adapter)
            start = time.perf_counter()
            result = train.run(_train_args(base, data_path, out, adapter, opts), verbose=False)
            seconds = time.perf_counter() - start
            after = _evaluate(base, out, data_dir, os.path.join(work, f"eval-{adapter}"), opts)
            print(
                f"{adapter}: {result.summary['steps']} steps in {seconds:.1f} s, final loss "
                f"{result.summary['train_loss_final']:.3f}, accuracy {100 * after['accuracy']:.1f}% "
                f"({after['correct']}/{after['total']})"
            )
            rows.append((adapter, result.summary, after))

        print()
        columns = f"{'trainable':>10} {'total':>10} {'trainable%':>10} {'before':>7} {'after':>7}"
        header = f"{'adapter, on all 7 projections':<29} {columns}"
        print(header)
        print("-" * len(header))
        for adapter, s, after in rows:
            what = "lora (r=32)" if adapter == "lora" else "parallel (bottleneck 32)"
            print(
                f"{what:<29} {s['trainable_params']:>10,} {s['total_params']:>10,} "
                f"{s['trainable_percent']:>9.2f}% "
                f"{100 * before['accuracy']:>6.1f}% {100 * after['accuracy']:>6.1f}%"
            )

        bench = compare_with_peft(base, train_items, opts)
        (pt, ps, pm), (ft, fs, fm) = bench["peft"], bench["fastadapters"]
        if pm == pm:  # measured on a GPU
            mem = f"peak memory {pm / 2**20:.1f} MiB vs {fm / 2**20:.1f} MiB (x{pm / fm:.2f} less)"
        else:
            mem = f"saved for backward {ps / 2**10:.0f} KiB vs {fs / 2**10:.0f} KiB (x{ps / fs:.2f} less)"
        print()
        print(
            f"training step, LoRA r=32 on 7 projections, batch {bench['shape'][0]}x{bench['shape'][1]}, "
            f"median of {opts.bench_steps}:\n  peft {1000 * pt:.1f} ms, fastadapters {1000 * ft:.1f} ms "
            f"(speed-up x{pt / ft:.2f}); {mem}"
        )
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
