"""Compares the two runs of scripts/peft_suite.sh and writes bench/results/<date>-peft-suite.{json,md}.

usage: python scripts/peft_suite_report.py PLAIN_DIR ACCELERATED_DIR OUT_STEM [--meta k=v ...]
PLAIN_DIR/outcomes.json and ACCELERATED_DIR/outcomes.json map test ids to passed/failed/skipped/error;
ACCELERATED_DIR/counts-*.json hold the LoRA-family forward calls per layer type
(scripts/peft_suite_plugin.py).
"""

import collections
import glob
import json
import sys


def _load(path):
    with open(path) as f:
        return json.load(f)


def _merge_counts(folder: str) -> dict:
    total: dict = {}
    for path in sorted(glob.glob(f"{folder}/counts-*.json")):
        for kind, c in _load(path).items():
            t = total.setdefault(kind, {"calls": 0, "fused": 0, "unfused_why": collections.Counter()})
            t["calls"] += c["calls"]
            t["fused"] += c["fused"]
            t["unfused_why"].update(c["unfused_why"])
    return {k: {**v, "unfused_why": dict(v["unfused_why"].most_common())} for k, v in sorted(total.items())}


# Calls whose PEFT forward computes no adapter term at all (the base layer's output only).
BASE_ONLY = ("adapters disabled", "adapter merged", "0 active adapters")


def _share(counts: dict, lora_only: bool) -> tuple[int, int]:
    rows = [v for k, v in counts.items() if k.startswith("lora.") or not lora_only]
    return sum(v["fused"] for v in rows), sum(v["calls"] for v in rows)


def _base_only(counts: dict) -> int:
    return sum(
        n
        for k, v in counts.items()
        if k.startswith("lora.")
        for why, n in v["unfused_why"].items()
        if why in BASE_ONLY
    )


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(
            "usage: peft_suite_report.py PLAIN_DIR ACCELERATED_DIR OUT_STEM [--meta k=v ...]", file=sys.stderr
        )
        return 2
    plain_dir, accel_dir, stem = argv[:3]
    meta = dict(a.split("=", 1) for a in argv[4:]) if argv[3:4] == ["--meta"] else {}
    plain, accel = _load(f"{plain_dir}/outcomes.json"), _load(f"{accel_dir}/outcomes.json")
    counts = _merge_counts(accel_dir)
    tests = sorted(set(plain) | set(accel))
    regressions = [t for t in tests if plain.get(t) == "passed" and accel.get(t) != "passed"]
    fixed = [t for t in tests if plain.get(t) not in (None, "passed") and accel.get(t) == "passed"]
    tally = {
        run: dict(collections.Counter(outcomes.values()).most_common())
        for run, outcomes in (("plain", plain), ("accelerated", accel))
    }
    fused, calls = _share(counts, lora_only=True)
    fused_all, calls_all = _share(counts, lora_only=False)
    base_only = _base_only(counts)
    report = {
        **meta,
        "tests": len(tests),
        "outcomes": tally,
        "pass_to_fail": regressions,
        "fail_to_pass": fixed,
        "lora_forward_calls": calls,
        "lora_forward_calls_fused": fused,
        "fused_share": fused / calls if calls else None,
        "base_only_calls": base_only,
        "fused_share_of_adapter_calls": fused / (calls - base_only) if calls > base_only else None,
        "all_lora_layer_family_calls": calls_all,
        "all_lora_layer_family_calls_fused": fused_all,
        "per_layer_type": counts,
    }
    with open(f"{stem}.json", "w") as f:
        json.dump(report, f, indent=1)
    lines = [
        "# PEFT's own test suite, plain and accelerated",
        "",
        "Written by `scripts/peft_suite.sh`: PEFT's tests (its source distribution for the installed "
        "version), run once as they are and once with every tuner PEFT builds passed through "
        "`fastadapters.accelerate`.",
        "",
        *(f"- {k}: {v}" for k, v in meta.items()),
        f"- tests run: {len(tests)}; plain: {tally['plain']}; accelerated: {tally['accelerated']}",
        "",
        f"## Pass → fail: {len(regressions)}",
        "",
        *(f"- `{t}` ({accel.get(t, 'not run')})" for t in regressions),
        *([] if regressions else ["None."]),
        "",
        f"Fail → pass: {len(fixed)}"
        + ("" if not fixed else " (" + ", ".join(f"`{t}`" for t in fixed[:10]) + ")"),
        "",
        "## LoRA forward calls that ran a fastadapters op",
        "",
        f"**{fused} of {calls} ({100 * fused / max(calls, 1):.1f}%)** forward calls of PEFT's LoRA layers "
        "(the classes of `peft.tuners.lora`) ran a fastadapters op. Layers of other tuners built on "
        f"`LoraLayer` (AdaLoRA, …) are listed too and not in that share ({fused_all} of {calls_all} with "
        f"them). {base_only} of the {calls} calls compute no adapter term in PEFT either (adapters disabled "
        "or merged, or no active adapter on the layer: the base layer only); of the other "
        f"{calls - base_only}, {100 * fused / max(calls - base_only, 1):.1f}% ran a fastadapters op.",
        "",
        "| layer type | calls | fused | share | why the rest took PEFT's path |",
        "|---|---:|---:|---:|---|",
    ]
    for kind, c in counts.items():
        why = "; ".join(f"{r}: {n}" for r, n in c["unfused_why"].items())
        share = 100 * c["fused"] / max(c["calls"], 1)
        lines.append(f"| {kind} | {c['calls']} | {c['fused']} | {share:.1f}% | {why} |")
    with open(f"{stem}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:12]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
