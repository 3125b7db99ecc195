"""Compares two `python -m bench` results: the time ratio B/A for every benchmark both runs have.

    python -m bench.compare A.json B.json [--filter TEXT] [--fail-above 1.10]
    python -m bench.compare A1.json,A2.json,A3.json B1.json,B2.json,B3.json [--fail-drop 0.05]

Benchmarks are matched by (op, shape, provider). Ratios below 1 mean B is faster. Per op, the
geometric mean of the ratios is printed too; benchmarks present in only one run are listed.
Within-run ratios (e.g. speedup over PEFT) are compared as well, since they cancel the machine.
--fail-above R exits with status 1 when any B/A time ratio exceeds R (a regression check).

With several runs on a side (comma-separated), the within-run speedups are compared instead: the
median over A's runs against the median over B's runs, per benchmark. Absolute times differ between
runs on a shared machine; a within-run ratio cancels most of that. --fail-drop F exits with status 1
when a median speedup of B is below (1 - F) times A's.
"""

import argparse
import sys

from bench import report


def describe(path: str, results: dict) -> str:
    fa = report.fastadapters_info(results)
    where = f"GPU {fa['gpu']}" if fa.get("gpu") else f"{fa.get('system', {}).get('cores', '?')}-core CPU"
    commit = str(fa.get("git_commit") or (results.get("commit_info") or {}).get("id") or "?")[:10]
    date = fa.get("date", results.get("datetime", "?"))
    return f"{path}: {date}, {fa.get('machine', '?')} ({where}), commit {commit}"


def compare(
    a: dict, b: dict, text_filter: str | None = None
) -> tuple[list[list[str]], list[float], list[str]]:
    """(table rows, B/A time ratios, keys in only one run)."""
    rows_a = {r.key: r for r in report.rows(a)}
    rows_b = {r.key: r for r in report.rows(b)}
    speed_a = {
        (op, s, p): v
        for op, items in report.speedups(report.by_op(rows_a.values())).items()
        for s, p, _, v in items
    }
    speed_b = {
        (op, s, p): v
        for op, items in report.speedups(report.by_op(rows_b.values())).items()
        for s, p, _, v in items
    }
    body, ratios, by_op = [], [], {}
    for key in rows_a:
        if key not in rows_b or (text_filter and text_filter not in " ".join(key)):
            continue
        ra, rb = rows_a[key], rows_b[key]
        if ra.median <= 0:
            continue
        ratio = rb.median / ra.median
        ratios.append(ratio)
        by_op.setdefault(key[0], []).append(ratio)
        sa, sb = speed_a.get(key), speed_b.get(key)
        within = f"{sa:.2f}× → {sb:.2f}×" if sa is not None and sb is not None else ""
        body.append([*key, report.fmt_time(ra.median), report.fmt_time(rb.median), f"{ratio:.3f}", within])
    for op, rs in by_op.items():
        body.append([op, "(geomean)", "", "", "", f"{report.geomean(rs):.3f}", ""])
    missing = [f"only in A: {' / '.join(k)}" for k in rows_a if k not in rows_b]
    missing += [f"only in B: {' / '.join(k)}" for k in rows_b if k not in rows_a]
    return body, ratios, missing


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def median_speedups(runs: list[dict]) -> dict[tuple[str, str, str], list[float]]:
    """(op, shape, provider) -> the within-run speedup over its baseline, one value per run."""
    out: dict[tuple[str, str, str], list[float]] = {}
    for results in runs:
        for op, items in report.speedups(report.by_op(report.rows(results))).items():
            for shape, provider, _, value in items:
                out.setdefault((op, shape, provider), []).append(value)
    return out


def compare_runs(runs_a: list[dict], runs_b: list[dict], text_filter: str | None = None):
    """(table rows, [(key, median B / median A)]) over the speedups both sides have."""
    sa, sb = median_speedups(runs_a), median_speedups(runs_b)
    body, changes = [], []
    for key, values_a in sa.items():
        if key not in sb or (text_filter and text_filter not in " ".join(key)):
            continue
        ma, mb = median(values_a), median(sb[key])
        changes.append((key, mb / ma))
        spread = lambda vs: "/".join(f"{v:.2f}" for v in sorted(vs))  # noqa: E731
        cells = [f"{ma:.3f} ({spread(values_a)})", f"{mb:.3f} ({spread(sb[key])})", f"{mb / ma:.3f}"]
        body.append([*key, *cells])
    return body, changes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="results JSON of run A (the reference)")
    p.add_argument("b", help="results JSON of run B")
    p.add_argument("--filter", help="only benchmarks whose op/shape/provider contains this text")
    p.add_argument("--fail-above", type=float, help="exit 1 when a B/A time ratio exceeds this")
    p.add_argument("--fail-drop", type=float, help="several runs: exit 1 when a median speedup drops by more")
    args = p.parse_args(argv)
    paths_a, paths_b = args.a.split(","), args.b.split(",")
    if len(paths_a) > 1 or len(paths_b) > 1:
        runs_a, runs_b = [report.load(x) for x in paths_a], [report.load(x) for x in paths_b]
        for side, paths, runs in (("A", paths_a, runs_a), ("B", paths_b, runs_b)):
            for path, results in zip(paths, runs):
                print(f"{side}: " + describe(path, results))
        print()
        body, changes = compare_runs(runs_a, runs_b, args.filter)
        header = ["op", "shape", "provider", "A median speedup (runs)", "B median speedup (runs)", "B / A"]
        print(report.table(header, body) if body else "no speedup in common")
        if changes:
            key, worst = min(changes, key=lambda kv: kv[1])
            print(f"\nworst median change: {worst:.3f} ({' / '.join(key)})")
        if args.fail_drop is not None:
            dropped = [k for k, c in changes if c < 1 - args.fail_drop]
            if dropped:
                print(f"{len(dropped)} speedup(s) dropped by more than {args.fail_drop:.0%}")
                return 1
        return 0
    a, b = report.load(args.a), report.load(args.b)
    print("A = " + describe(args.a, a))
    print("B = " + describe(args.b, b))
    print()
    body, ratios, missing = compare(a, b, args.filter)
    header = ["op", "shape", "provider", "A median", "B median", "B / A", "speedup over baseline A → B"]
    print(report.table(header, body) if body else "no benchmark in common")
    for line in missing:
        print(line)
    if args.fail_above is not None:
        worse = [r for r in ratios if r > args.fail_above]
        if worse:
            print(f"{len(worse)} benchmark(s) slower than {args.fail_above}× A")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
