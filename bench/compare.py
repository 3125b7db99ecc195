"""Compares two `python -m bench` results: the time ratio B/A for every benchmark both runs have.

    python -m bench.compare A.json B.json [--filter TEXT] [--fail-above 1.10]

Benchmarks are matched by (op, shape, provider). Ratios below 1 mean B is faster. Per op, the
geometric mean of the ratios is printed too; benchmarks present in only one run are listed.
Within-run ratios (e.g. speedup over PEFT) are compared as well, since they cancel the machine.
--fail-above R exits with status 1 when any B/A time ratio exceeds R (a regression check).
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="results JSON of run A (the reference)")
    p.add_argument("b", help="results JSON of run B")
    p.add_argument("--filter", help="only benchmarks whose op/shape/provider contains this text")
    p.add_argument("--fail-above", type=float, help="exit 1 when a B/A time ratio exceeds this")
    args = p.parse_args(argv)
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
