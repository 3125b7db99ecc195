"""The training-step providers of bench_train_step.py timed side by side, in interleaved rounds.

    python -m bench.side_by_side                    # the tiny-Llama setup, 15 rounds
    python -m bench.side_by_side --rounds 30 --threads 1 --save

pytest-benchmark times each provider in its own window of time, so on a shared machine the ratios of
one `python -m bench` run move with the machine's load. Here every round runs each provider's step once
(the order rotates from round to round) and a provider's speedup is the median, over rounds, of
t(peft) / t(provider) within the same round; the quartiles of those per-round ratios show how far to
trust it. Prints a markdown table; --save also writes it, with the raw times, to
bench/results/<date>-<machine>-side-by-side.{md,json}.
"""

import argparse
import datetime
import json
import os
import statistics
import time

import torch

from bench import bench_train_step as ts
from bench.__main__ import RESULTS_DIR, machine_name, system_info
from bench.common import saved_bytes, synchronize


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return q1, q2, q3


def run(rounds: int, providers: list[str]) -> dict:
    """{provider: {"times": [s per round], "saved_bytes": int}} from interleaved rounds."""
    s = ts.SHAPES[0]  # the tiny-Llama setup (the smoke shape under FASTADAPTERS_BENCH_SMOKE=1)
    steps, out = {}, {}
    for provider in providers:
        model, _, forward, step = ts.make_step(provider, s)
        step()  # optimizer state and first-call costs outside the timed rounds
        saved = saved_bytes(forward, exclude=list(model.parameters()))
        steps[provider] = step
        out[provider] = {"times": [], "saved_bytes": saved}
    for r in range(rounds):
        for i in range(len(providers)):
            provider = providers[(r + i) % len(providers)]
            synchronize()
            start = time.perf_counter()
            steps[provider]()
            synchronize()
            out[provider]["times"].append(time.perf_counter() - start)
    return {"shape": ts.shape_name(s), "rounds": rounds, "providers": out}


def table(result: dict) -> str:
    runs = result["providers"]
    peft = runs["peft"]
    lines = [
        f"Training step, {result['shape']}, {result['rounds']} interleaved rounds, "
        f"{torch.get_num_threads()} threads.",
        "",
        "| provider | median time | speedup × peft (per-round median [q1, q3]) | saved bytes × peft |",
        "|---|---|---|---|",
    ]
    for provider, run_ in runs.items():
        ratios = [p / t for p, t in zip(peft["times"], run_["times"])]
        q1, q2, q3 = quartiles(ratios)
        speed = "1" if provider == "peft" else f"{q2:.3f} [{q1:.3f}, {q3:.3f}]"
        saved = run_["saved_bytes"] / peft["saved_bytes"]
        median_ms = statistics.median(run_["times"]) * 1e3
        lines.append(f"| {provider} | {median_ms:.0f} ms | {speed} | {saved:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--providers", default=",".join(ts.PROVIDERS), help="comma-separated, peft first")
    p.add_argument("--save", action="store_true", help="write bench/results/<date>-<machine>-side-by-side.*")
    args = p.parse_args(argv)
    providers = [x.strip() for x in args.providers.split(",") if x.strip()]
    unknown = [x for x in providers if x not in ts.PROVIDERS]
    if unknown or not providers or providers[0] != "peft":
        raise SystemExit(f"--providers: peft first, then any of {ts.PROVIDERS}; got {providers}")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.rounds, providers)
    text = table(result)
    print(text)
    if args.save:
        sysinfo = system_info()
        stem = os.path.join(
            RESULTS_DIR, f"{datetime.datetime.now():%Y-%m-%d_%H%M}-{machine_name(sysinfo)}-side-by-side"
        )
        with open(stem + ".md", "w") as f:
            f.write(text)
        with open(stem + ".json", "w") as f:
            json.dump({"system": sysinfo, "threads": torch.get_num_threads(), **result}, f, indent=1)
        print(f"wrote {stem}.md and .json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
