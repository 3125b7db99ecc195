"""Markdown report and PNG plots from a `python -m bench` results JSON.

The JSON is pytest-benchmark's own (machine_info, commit_info, benchmarks) plus a "fastadapters" key
written by bench/__main__.py (date, machine, command, versions, per-file run status). Each benchmark's
extra_info follows bench/common.py: op, provider, shape and optional saved_bytes, tokens, flops,
bytes, rank, peak_rss_mb, max_memory_allocated_mb.

    python -m bench.report RESULTS.json        # (re)writes RESULTS.md and its PNGs next to it
"""

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

from bench.common import BASELINES

# Within a group, the provider a speedup is measured against: PEFT where it has the op, else eager,
# else the plain-PyTorch reference.
PRIMARY = ("peft", "eager", "reference")
ORDER = ("frozen", "base", "gemms", "reference", "peft", "eager")
# A group's floor, the unavoidable work measured in the same run: the frozen layer or model (LoRA, the
# training step, serving), or the GEMMs alone (the bottleneck adapter).
FLOORS = ("frozen", "base", "gemms")
CEILING_OP = "ceiling"


@dataclass
class Row:
    op: str
    provider: str
    shape: str
    group: str
    median: float
    q1: float
    q3: float
    rounds: int
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.op, self.shape, self.provider)


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def rows(results: dict) -> list[Row]:
    """One Row per benchmark, labelled by bench.common.record (older names fall back on the group)."""
    out = []
    for b in results.get("benchmarks", []):
        info = dict(b.get("extra_info") or {})
        group = b.get("group") or info.get("op", b.get("name", "?"))
        op = info.pop("op", None) or group.split(" ", 1)[0]
        shape = info.pop("shape", None) or (group.split(" ", 1)[1] if " " in group else "")
        provider = info.pop("provider", None) or b.get("param") or b.get("name", "?")
        s = b["stats"]
        q1, q3 = s.get("q1", s["median"]), s.get("q3", s["median"])
        out.append(Row(op, provider, shape, group, s["median"], q1, q3, int(s.get("rounds", 0)), info))
    return out


def fastadapters_info(results: dict) -> dict:
    return results.get("fastadapters") or {}


def is_gpu(results: dict) -> bool:
    return bool(fastadapters_info(results).get("gpu"))


# ---------------------------------------------------------------- formatting


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_ratio(x: float | None) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.3f}"


def fmt_num(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return ""
    return f"{x:,.0f}" if abs(x) >= 10**digits else f"{x:.{digits}g}"


def provider_order(provider: str) -> tuple:
    if provider in ORDER:
        return (0, ORDER.index(provider), provider)
    return (1 if provider.startswith("fastadapters") else 2, 0, provider)


def table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def geomean(xs: list[float]) -> float:
    xs = [x for x in xs if x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else float("nan")


# ---------------------------------------------------------------- analysis


def by_op(all_rows: list[Row]) -> dict[str, dict[str, dict[str, Row]]]:
    """op -> shape -> provider -> Row, in first-seen order of ops and shapes."""
    ops: dict[str, dict[str, dict[str, Row]]] = {}
    for r in all_rows:
        ops.setdefault(r.op, {}).setdefault(r.shape, {})[r.provider] = r
    return ops


def primary_baseline(group: dict[str, Row]) -> str | None:
    return next((p for p in PRIMARY if p in group), None)


def ceilings(all_rows: list[Row]) -> dict[str, float]:
    """Best measured copy bandwidth (bytes/s) and matmul rate (flop/s) of the run."""
    out = {}
    for r in all_rows:
        if r.op != CEILING_OP or r.median <= 0:
            continue
        if r.provider == "copy" and r.extra.get("bytes"):
            out["bytes_per_s"] = max(out.get("bytes_per_s", 0.0), r.extra["bytes"] / r.median)
        if r.provider.startswith("matmul") and r.extra.get("flops"):
            out["flops_per_s"] = max(out.get("flops_per_s", 0.0), r.extra["flops"] / r.median)
    return out


def speedups(ops: dict) -> dict[str, list[tuple[str, str, str, float]]]:
    """op -> [(shape, provider, baseline, t(baseline)/t(provider))] for non-baseline providers."""
    out: dict[str, list] = {}
    for op, shapes in ops.items():
        if op == CEILING_OP:
            continue
        for shape, group in shapes.items():
            base = primary_baseline(group)
            if base is None:
                continue
            for provider, r in group.items():
                if provider in BASELINES or r.median <= 0:
                    continue
                out.setdefault(op, []).append((shape, provider, base, group[base].median / r.median))
    return out


RANK_TOKEN = re.compile(r"(?:^|[\s,_])(?:r|rank)[=:]?\d+(?=$|[\s,_])")


def r_values(ops: dict) -> list[tuple[str, str, str, int | None, float]]:
    """[(op, shape, provider, rank, R = t(provider)/t(floor))] for every group with a floor (FLOORS)."""
    out = []
    for op, shapes in ops.items():
        for shape, group in shapes.items():
            floor = next((group[f] for f in FLOORS if f in group), None)
            if floor is None or floor.median <= 0:
                continue
            for provider, r in group.items():
                if provider in FLOORS:
                    continue
                rank = r.extra.get("rank")
                out.append((op, shape, provider, rank, r.median / floor.median))
    return out


# ---------------------------------------------------------------- plots


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the GPU machine may lack it: the report then has tables only
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return False
    return True


def plot_speedup(ops: dict, path: str) -> str | None:
    """Bar chart per op: t(baseline)/t(provider) for each shape, one bar per provider; None if no data."""
    data = speedups(ops)
    if not data or not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(data)
    fig, axes = plt.subplots(n, 1, figsize=(10, 3.2 * n + 0.6), squeeze=False)
    for ax, (op, items) in zip(axes[:, 0], data.items()):
        shapes = list(dict.fromkeys(s for s, _, _, _ in items))
        providers = sorted({p for _, p, _, _ in items}, key=provider_order)
        bases = sorted({b for _, _, b, _ in items})
        width = 0.8 / len(providers)
        for i, provider in enumerate(providers):
            vals = {s: v for s, p, _, v in items if p == provider}
            xs = [j + (i - (len(providers) - 1) / 2) * width for j, s in enumerate(shapes) if s in vals]
            ys = [vals[s] for s in shapes if s in vals]
            bars = ax.bar(xs, ys, width=width, label=provider)
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes, rotation=20, ha="right", fontsize=7)
        ax.set_ylabel(f"speedup over {'/'.join(bases)}")
        ax.set_title(f"{op}: t({'/'.join(bases)}) / t(provider), higher is faster", fontsize=10)
        ax.legend(fontsize=7, loc="best")
        ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_r_vs_rank(ops: dict, path: str) -> str | None:
    """R = t(adapter layer)/t(frozen layer) against rank, one line per provider and shape; None if no data."""
    points = [(op, shape, p, rank, r) for op, shape, p, rank, r in r_values(ops) if rank is not None]
    if not points or not have_matplotlib():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One colour per provider, one line style per shape (the shape without its rank).
    lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for op, shape, provider, rank, r in points:
        rest = " ".join(RANK_TOKEN.sub(" ", f" {shape} ").split())
        lines.setdefault((f"{op} {provider}", rest), []).append((int(rank), r))
    providers = sorted({k[0] for k in lines}, key=lambda k: provider_order(k.split(" ", 1)[1]))
    variants = sorted({k[1] for k in lines})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
    fig, ax = plt.subplots(figsize=(9, 5))
    for (provider, rest), pts in sorted(lines.items(), key=lambda kv: (providers.index(kv[0][0]), kv[0][1])):
        pts = sorted(pts)
        style, marker = styles[variants.index(rest) % len(styles)]
        color = colors[providers.index(provider) % len(colors)]
        label = provider + (f" [{rest}]" if rest else "")
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=marker, color=color, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    ranks = sorted({int(p[3]) for p in points})
    ax.set_xticks(ranks)
    ax.set_xticklabels([str(r) for r in ranks])
    ax.set_xlabel("rank r")
    ax.set_ylabel("R = t(adapter layer) / t(frozen layer)")
    ax.set_title("Adapter overhead over the frozen layer (1.0 = free), lower is better", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- markdown


def header_lines(results: dict) -> list[str]:
    fa = fastadapters_info(results)
    sysinfo = fa.get("system", {})
    versions = ", ".join(f"{k} {v}" for k, v in sysinfo.get("versions", {}).items() if v)
    commit = results.get("commit_info") or {}
    sha = fa.get("git_commit") or commit.get("id") or "unknown"
    dirty = fa.get("git_dirty", commit.get("dirty"))
    lines = [
        f"- date: {fa.get('date', results.get('datetime', '?'))}",
        f"- machine: {fa.get('machine', '?')} — {sysinfo.get('cpu', '?')}, {sysinfo.get('cores', '?')} cores"
        + (f", GPU {fa['gpu']}" if fa.get("gpu") else ", no GPU"),
        f"- command: `{fa.get('command', '?')}` (mode: {fa.get('mode', '?')})",
        f"- commit: {sha}{' (with uncommitted changes)' if dirty else ''}",
        f"- versions: {versions or '?'}",
        "- timer: "
        + (
            "CUDA events (triton.testing.do_bench), median and IQR over runs"
            if fa.get("gpu")
            else "time.perf_counter"
        ),
    ]
    if busy_note(results):
        lines.append(f"- **{busy_note(results)}**")
    return lines


def busy_note(results: dict) -> str:
    """A warning when the 1-min load average exceeded 1.5x the cores at the start or end of the run."""
    fa = fastadapters_info(results)
    sysinfo = fa.get("system", {})
    loads = [x[0] for x in (sysinfo.get("load_average"), fa.get("load_average_end")) if x]
    cores = sysinfo.get("cores") or 0
    if loads and cores and max(loads) > 1.5 * cores:
        return (
            f"warning: the machine was busy (1-min load average up to {max(loads):.1f} on {cores} cores); "
            "CPU times are inflated and noisy, ratios less so"
        )
    return ""


def run_status(results: dict) -> str:
    runs = fastadapters_info(results).get("runs", [])
    if not runs:
        return ""
    body = []
    for run in runs:
        notes = "; ".join(run.get("notes", [])[:6])
        body.append(
            [run["file"], run["status"], f"{run.get('seconds', 0):.0f} s", str(run.get("count", 0)), notes]
        )
    return table(["bench file", "status", "wall", "results", "failures / skips"], body)


def op_section(op: str, shapes: dict, ceil: dict, gpu: bool) -> str:
    all_rows = [r for g in shapes.values() for r in g.values()]
    bases = [b for b in BASELINES if any(b in g for g in shapes.values())]
    has = lambda k: any(k in r.extra for r in all_rows)
    header = ["shape", "provider", "median", "IQR"] + [f"t / t({b})" for b in bases]
    if has("saved_bytes"):
        header += ["saved MiB", "saved / baseline's"]
    if has("tokens"):
        header += ["tokens/s"]
    if has("peak_rss_mb"):
        header += ["peak RSS MiB"]
    if has("max_memory_allocated_mb"):
        header += ["max alloc MiB"]
    flop_unit, flop_scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
    if has("bytes"):
        header += ["GB/s"] + (["% copy"] if "bytes_per_s" in ceil else [])
    if has("flops"):
        header += [flop_unit] + (["% matmul"] if "flops_per_s" in ceil else [])
    body = []
    for shape, group in shapes.items():
        base = primary_baseline(group)
        for provider in sorted(group, key=provider_order):
            r = group[provider]
            cells = [shape, provider, fmt_time(r.median), f"{fmt_time(r.q1)} – {fmt_time(r.q3)}"]
            for b in bases:
                ok = b in group and b != provider and group[b].median > 0
                cells.append(fmt_ratio(r.median / group[b].median) if ok else "")
            if has("saved_bytes"):
                sb = r.extra.get("saved_bytes")
                ref = group[base].extra.get("saved_bytes") if base else None
                ratio = sb / ref if sb is not None and ref and base != provider else None
                cells += [fmt_num(sb / 2**20) if sb is not None else "", fmt_ratio(ratio)]
            if has("tokens"):
                tok = r.extra.get("tokens")
                cells.append(fmt_num(tok / r.median) if tok and r.median > 0 else "")
            if has("peak_rss_mb"):
                cells.append(fmt_num(r.extra.get("peak_rss_mb")))
            if has("max_memory_allocated_mb"):
                cells.append(fmt_num(r.extra.get("max_memory_allocated_mb")))
            if has("bytes"):
                bw = r.extra["bytes"] / r.median if r.extra.get("bytes") and r.median > 0 else None
                cells.append(fmt_num(bw / 1e9) if bw else "")
                if "bytes_per_s" in ceil:
                    cells.append(f"{100 * bw / ceil['bytes_per_s']:.0f}%" if bw else "")
            if has("flops"):
                fl = r.extra["flops"] / r.median if r.extra.get("flops") and r.median > 0 else None
                cells.append(fmt_num(fl / flop_scale) if fl else "")
                if "flops_per_s" in ceil:
                    cells.append(f"{100 * fl / ceil['flops_per_s']:.0f}%" if fl else "")
            body.append(cells)
    return table(header, body)


def summary_rows(ops: dict) -> list[list[str]]:
    """Per op and provider: the geometric-mean speedup over the baseline, and its range over shapes."""
    body = []
    for op, items in speedups(ops).items():
        for provider in sorted({p for _, p, _, _ in items}, key=provider_order):
            vals = [v for _, p, _, v in items if p == provider]
            base = "/".join(sorted({b for _, p, b, _ in items if p == provider}))
            body.append(
                [
                    op,
                    provider,
                    base,
                    f"{geomean(vals):.2f}×",
                    f"{min(vals):.2f}× – {max(vals):.2f}×",
                    str(len(vals)),
                ]
            )
    return body


def render(results: dict, plots: dict[str, str | None]) -> str:
    all_rows = rows(results)
    ops = by_op(all_rows)
    gpu = is_gpu(results)
    ceil = ceilings(all_rows)
    out = ["# fastadapters benchmark report", "", *header_lines(results), ""]
    out += [
        "Times are medians over the timed rounds, with the interquartile range (q1 – q3). "
        "`t / t(X)` is this provider's time over provider X's time in the same shape and run "
        "(below 1 is faster). Speedup = t(baseline)/t(provider) (above 1 is faster), against PEFT, "
        "or eager/reference where PEFT lacks the op. R = t(provider)/t(floor), the floor being the frozen "
        "layer or model, or the bottleneck's GEMMs alone, measured in the same run.",
        "",
    ]
    status = run_status(results)
    if status:
        out += ["## Runs", "", status, ""]
    if ceil:
        parts = []
        if "bytes_per_s" in ceil:
            parts.append(f"copy bandwidth {ceil['bytes_per_s'] / 1e9:.1f} GB/s")
        if "flops_per_s" in ceil:
            unit, scale = ("TFLOP/s", 1e12) if gpu else ("GFLOP/s", 1e9)
            parts.append(f"matmul {ceil['flops_per_s'] / scale:.3g} {unit}")
        out += ["## Ceilings (measured in this run)", "", ", ".join(parts) + ".", ""]
    summary = summary_rows(ops)
    if summary:
        out += ["## Summary: speedup over the baseline", ""]
        out += [table(["op", "provider", "baseline", "geomean", "range", "shapes"], summary), ""]
    images = [
        (title, p)
        for title, p in (
            ("Speedup over PEFT per op", plots.get("speedup")),
            ("R against rank", plots.get("r_vs_rank")),
        )
        if p
    ]
    for title, p in images:
        out += [f"![{title}]({os.path.basename(p)})", ""]
    rv = r_values(ops)
    if rv:
        body = [[op, shape, p, "" if rank is None else str(rank), f"{r:.3f}"] for op, shape, p, rank, r in rv]
        out += [
            "## R = t(provider) / t(floor)",
            "",
            table(["op", "shape", "provider", "rank", "R"], body),
            "",
        ]
    for op, shapes in ops.items():
        if op == CEILING_OP:
            continue
        out += [f"## {op}", "", op_section(op, shapes, ceil, gpu), ""]
    if CEILING_OP in ops:
        out += [f"## {CEILING_OP}", "", op_section(CEILING_OP, ops[CEILING_OP], ceil, gpu), ""]
    if not all_rows:
        out += ["No benchmark results in this run.", ""]
    return "\n".join(out)


def write_report(results_path: str) -> tuple[str, list[str]]:
    """Writes <stem>.md and <stem>-speedup.png / <stem>-r-vs-rank.png next to the results JSON."""
    results = load(results_path)
    stem = os.path.splitext(results_path)[0]
    ops = by_op(rows(results))
    plots = {
        "speedup": plot_speedup(ops, f"{stem}-speedup.png"),
        "r_vs_rank": plot_r_vs_rank(ops, f"{stem}-r-vs-rank.png"),
    }
    md_path = f"{stem}.md"
    with open(md_path, "w") as f:
        f.write(render(results, plots))
    return md_path, [p for p in plots.values() if p]


# ---------------------------------------------------------------- README block

README_BEGIN = "<!-- bench:begin (generated by `python -m bench --update-readme`; do not edit by hand) -->"
README_END = "<!-- bench:end -->"


def readme_block(runs: list[tuple[str, dict]]) -> str:
    """The README's Performance figures: for each (path, results) the headline numbers of that run."""
    out = []
    if not runs:
        return "No benchmark results yet: run `make bench`."
    for path, results in runs:
        fa = fastadapters_info(results)
        all_rows = rows(results)
        ops = by_op(all_rows)
        where = f"GPU {fa['gpu']}" if fa.get("gpu") else f"{fa.get('system', {}).get('cores', '?')}-core CPU"
        out += [
            f"**{where}** — {fa.get('date', '?')}, machine `{fa.get('machine', '?')}`, "
            f"commit {str(fa.get('git_commit', '?'))[:10]}, command `{fa.get('command', '?')}` "
            f"(full report: `{os.path.splitext(path)[0]}.md`).",
            "",
        ]
        if busy_note(results):
            out += [f"*{busy_note(results)}.*", ""]
        summary = summary_rows(ops)
        if summary:
            out += [
                table(["op", "provider", "baseline", "speedup (geomean)", "range", "shapes"], summary),
                "",
            ]
        train = ops.get("train_step", {})
        body = []
        for shape, group in train.items():
            base, frozen = group.get("peft"), group.get("frozen")
            for provider in sorted(group, key=provider_order):
                r = group[provider]
                tok = r.extra.get("tokens")
                sb, base_sb = r.extra.get("saved_bytes"), base.extra.get("saved_bytes") if base else None
                body.append(
                    [
                        shape,
                        provider,
                        fmt_time(r.median),
                        fmt_num(tok / r.median) if tok else "",
                        fmt_ratio(base.median / r.median) if base and provider != "peft" else "",
                        fmt_ratio(r.median / frozen.median) if frozen and provider != "frozen" else "",
                        fmt_ratio(sb / base_sb) if sb is not None and base_sb and provider != "peft" else "",
                        fmt_num(r.extra.get("max_memory_allocated_mb")),
                    ]
                )
        if body:
            header = [
                "train step",
                "provider",
                "time",
                "tokens/s",
                "speedup × peft",
                "t / t(frozen)",
                "saved bytes × peft",
                "max alloc MiB (GPU)",
            ]
            out += [table(header, body), ""]
        rv = [(op, shape, p, r) for op, shape, p, _, r in r_values(ops) if op == "lora" and p != "peft"]
        peft_r = [r for op, _, p, _, r in r_values(ops) if op == "lora" and p == "peft"]
        if rv:
            line = ", ".join(
                f"{p} {min(r for _, _, q, r in rv if q == p):.2f}–{max(r for _, _, q, r in rv if q == p):.2f}"
                for p in sorted({p for _, _, p, _ in rv}, key=provider_order)
            )
            if peft_r:
                line += f"; peft {min(peft_r):.2f}–{max(peft_r):.2f}"
            out += [f"LoRA layer overhead R = t(adapter layer)/t(frozen layer): {line}.", ""]
        floors = [(p, r) for op, _, p, _, r in r_values(ops) if op == "bottleneck_adapter"]
        if floors:
            line = ", ".join(
                f"{p} {min(r for q, r in floors if q == p):.2f}–{max(r for q, r in floors if q == p):.2f}"
                for p in sorted({p for p, _ in floors}, key=provider_order)
            )
            out += [f"Bottleneck adapter fwd+bwd over its six GEMMs alone, t/t(GEMMs): {line}.", ""]
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme_path: str, block: str) -> None:
    """Replaces the text between the README's bench markers with `block`."""
    with open(readme_path) as f:
        text = f.read()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"{readme_path} has no '{README_BEGIN}' ... '{README_END}' block to rewrite")
    text = text[: begin + len(README_BEGIN)] + "\n" + block + text[end:]
    with open(readme_path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print(__doc__)
        return 2
    for path in args:
        md, pngs = write_report(path)
        print(md, *pngs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
