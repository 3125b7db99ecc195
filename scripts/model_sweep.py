"""Every causal LM of the installed transformers, each adapter kind, every check: the full sweep.

    .venv/bin/python scripts/model_sweep.py [--only qwen3,gemma2] [--out bench/results/model_sweep]

Builds each `*ForCausalLM` class (transformers' MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) tiny from its config
(tests/any_model.py), skips with the reason those that cannot be built tiny, and runs, per adapter kind
(LoRA default targets, LoRA all-linear, series AdapterH, parallel, prefix), apply / forward / backward /
generate / remove-restores-the-base, LoRA against PEFT and prefix generation with and without the KV
cache. Writes <out>.json (every result) and <out>.md (the summary table and every refusal or failure).
CPU only; about 20-40 minutes on 2 shared cores.
"""

import argparse
import json
import platform
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import any_model  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

LIMIT_S = 240  # per model type


class _Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise _Timeout(f"over {LIMIT_S} s")


def sweep(only: list[str] | None) -> dict:
    classes = any_model.causal_lm_classes()
    results = {}
    signal.signal(signal.SIGALRM, _alarm)
    for model_type, cls in classes.items():
        if only and model_type not in only:
            continue
        start = time.time()
        entry = {"class": cls}
        signal.alarm(LIMIT_S)
        try:
            model, why = any_model.build(model_type)
            if model is None:
                entry["skipped"] = why
            else:
                entry["structure"] = any_model.describe_structure(model)
                entry["kinds"] = {kind: any_model.check(model, kind) for kind in any_model.KINDS}
        except _Timeout as exc:
            entry.setdefault("skipped", f"timed out ({exc})")
        finally:
            signal.alarm(0)
        entry["seconds"] = round(time.time() - start, 1)
        results[model_type] = entry
        status = entry.get("skipped") or " ".join(
            f"{k}={'ok' if r['ok'] else 'no'}" for k, r in entry["kinds"].items()
        )
        print(f"{model_type:28s} {entry['seconds']:6.1f}s {status[:150]}", flush=True)
    return results


def _cell(result: dict) -> str:
    """yes; refused (a ValueError from apply, before anything changed); FAIL (anything else)."""
    if result["ok"]:
        return "yes"
    refused = "apply" not in result["checks"] and (result["error"] or "").startswith("ValueError")
    return "refused" if refused else "FAIL"


def report(results: dict) -> str:
    built = {k: v for k, v in results.items() if "kinds" in v}
    lines = [
        "# Model sweep: every causal LM of the installed transformers",
        "",
        f"transformers {transformers.__version__}, torch {torch.__version__}, {platform.machine()} CPU, "
        f"{time.strftime('%Y-%m-%d')}. Written by `scripts/model_sweep.py` (tiny random models built from "
        "each config class; see tests/any_model.py).",
        "",
        f"Causal LM model types found: **{len(results)}** ({len({v['class'] for v in results.values()})} "
        f"distinct classes); built tiny: **{len(built)}**; skipped: {len(results) - len(built)}.",
        "",
        "Per kind, *yes* means every check passed: apply, forward (the adapter changes the logits), backward "
        "(finite gradients, some non-zero), generate, remove restores the exact base (state dict and "
        "logits); "
        "LoRA logits equal PEFT's on the same targets; prefix greedy generation with the KV cache equals it "
        "without. *refused* is a clear ValueError before anything changes; *FAIL* anything else.",
        "",
        "| kind | passed | refused | failed |",
        "|---|---|---|---|",
    ]
    for kind in any_model.KINDS:
        cells = [_cell(v["kinds"][kind]) for v in built.values()]
        counts = " | ".join(str(cells.count(c)) for c in ("refused", "FAIL"))
        lines.append(f"| {kind} | {cells.count('yes')} of {len(built)} | {counts} |")
    lines += ["", "| model type | class | " + " | ".join(any_model.KINDS) + " | trace |"]
    lines += ["|---" * (len(any_model.KINDS) + 3) + "|"]
    for model_type, v in built.items():
        cells = " | ".join(_cell(v["kinds"][k]) for k in any_model.KINDS)
        trace = v["structure"]["trace"]
        lines.append(
            f"| {model_type} | {v['class']} | {cells} | {trace if trace == 'complete' else 'partial'} |"
        )
    lines += ["", "## Refusals and failures", ""]
    for model_type, v in built.items():
        for kind, r in v["kinds"].items():
            if not r["ok"]:
                lines.append(f"- **{model_type}** {kind}: {_cell(r)}: {r['error']}")
    notes = [
        f"- **{m}** {k}: {r['checks']['equals_peft']}"
        for m, v in built.items()
        for k, r in v["kinds"].items()
        if "(" in str(r["checks"].get("equals_peft", ""))
        or "not compared" in str(r["checks"].get("equals_peft"))
    ]
    if notes:
        lines += ["", "## Differences from PEFT's target resolution", "", *notes]
    lines += ["", "## Skipped", ""]
    lines += [f"- {m} ({v['class']}): {v['skipped']}" for m, v in results.items() if "skipped" in v]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated model types (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "model_sweep"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = sweep(args.only.split(",") if args.only else None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    text = report(results)
    out.with_suffix(".md").write_text(text)
    print(text.split("\n\n| model type")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
