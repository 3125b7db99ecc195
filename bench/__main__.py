"""Runs the benchmark suite and writes bench/results/<date>-<machine>.json, .md and PNG plots.

    python -m bench                       # the quick suite: every bench/bench_*.py (< 10 min on 2 CPU cores)
    python -m bench --only lora,train_step --filter "r16"     # a subset (bench file names, pytest -k)
    python -m bench --update-readme       # then rewrites the README's Performance block
    python -m bench --update-readme --no-run                  # only rewrites it, from the latest results
    python -m bench --smoke               # tiny shapes, one round each: checks the pipeline end to end

Each bench file runs in its own pytest process (pytest-benchmark, --benchmark-json) under a time
limit, so one slow or failing file cannot lose the others' results. The JSON is pytest-benchmark's
own format (its "benchmarks" from every file) plus a "fastadapters" key: date, machine, command,
CPU, cores, GPU, package versions, git commit and each file's status. On a GPU the same files run
at their GPU shapes (bench.common.pick), timed with CUDA events (bench/conftest.py).
"""

import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")
# Run first: the ceilings (cheap, and the report needs them); run last: the end-to-end paths.
FIRST, LAST = ("ceilings",), ("train_step", "serving")
PACKAGES = ("torch", "triton", "transformers", "peft", "accelerate", "pytest-benchmark", "fastadapters")


def bench_files(only: list[str] | None) -> list[str]:
    names = [
        os.path.basename(p)[len("bench_") : -len(".py")]
        for p in glob.glob(os.path.join(BENCH_DIR, "bench_*.py"))
    ]
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise SystemExit(f"--only {unknown}: no such bench file; have {sorted(names)}")
        names = [n for n in names if n in only]

    def order(n):
        return (0 if n in FIRST else 2 if n in LAST else 1, LAST.index(n) if n in LAST else 0, n)

    return [os.path.join(BENCH_DIR, f"bench_{n}.py") for n in sorted(names, key=order)]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git(*args) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def system_info() -> dict:
    """Machine and software facts for the results JSON (GPU name and ceilings come from torch)."""
    import torch

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    versions["cuda"] = torch.version.cuda
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {
        "cpu": cpu_model(),
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "versions": versions,
        "gpu": gpu,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if gpu:
        props = torch.cuda.get_device_properties(0)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


def machine_name(sysinfo: dict) -> str:
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", platform.node() or "host")
    kind = sysinfo["gpu"] or f"cpu{sysinfo['cores']}"
    kind = re.sub(r"[^A-Za-z0-9]+", "-", kind.replace("NVIDIA ", "")).strip("-").lower()
    return f"{host}-{kind}"


def summarize_output(text: str) -> list[str]:
    """The FAILED / ERROR / SKIPPED lines of pytest's -r summary (and a timeout's last line)."""
    keep = [ln.strip() for ln in text.splitlines() if re.match(r"^(FAILED|ERROR|SKIPPED)\b", ln.strip())]
    return [ln[:300] for ln in keep[:20]]


def run_file(path: str, args, env: dict, json_path: str, timeout: float) -> dict:
    """Runs one bench file under pytest-benchmark, killed after `timeout` s; returns its status record."""
    cmd = [
        sys.executable, "-m", "pytest", path,
        "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rfEs", "--benchmark-only",
        f"--benchmark-json={json_path}", "--benchmark-sort=name",
        "--benchmark-columns=min,median,iqr,rounds", f"--benchmark-max-time={args.max_time}",
        f"--benchmark-min-rounds={args.min_rounds}",
    ]  # fmt: skip
    if args.smoke:
        cmd += ["--benchmark-warmup=off", "--benchmark-min-time=0"]
    if args.filter:
        cmd += ["-k", args.filter]
    name = os.path.basename(path)
    print(f"== {name}", flush=True)
    start = time.time()
    env = dict(env, FASTADAPTERS_BENCH_PARTIAL=json_path + ".partial")
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        output = (
            (exc.stdout or b"").decode(errors="replace")
            if isinstance(exc.stdout, bytes)
            else exc.stdout or ""
        )
    seconds = time.time() - start
    status = {0: "ok", 1: "failures", 5: "no benchmarks", 124: "timeout"}.get(rc, f"error (rc {rc})")
    if rc == 124:
        status = f"timeout after {timeout:.0f} s"
    tail = output.strip().splitlines()[-25:]
    if args.verbose or rc not in (0, 5):
        print("\n".join(tail), flush=True)
    record = {
        "file": name,
        "status": status,
        "rc": rc,
        "seconds": round(seconds, 1),
        "notes": summarize_output(output),
    }
    if rc not in (0, 5) and not record["notes"]:
        record["notes"] = [ln[:300] for ln in tail[-3:]]
    print(f"   {status} in {seconds:.0f} s", flush=True)
    return record


def read_part(json_path: str) -> dict | None:
    """A file's pytest-benchmark JSON or, when it was killed before writing it, its partial JSON lines."""
    if os.path.exists(json_path):
        with open(json_path) as f:
            return json.load(f)
    if os.path.exists(json_path + ".partial"):
        with open(json_path + ".partial") as f:
            return {"benchmarks": [json.loads(line) for line in f if line.strip()]}
    return None


def merge(parts: list[dict]) -> dict:
    """One pytest-benchmark JSON from several: the first's metadata, every file's benchmarks."""
    merged = {"benchmarks": []}
    for part in parts:
        for key in ("machine_info", "commit_info", "datetime", "version"):
            merged.setdefault(key, part.get(key))
        merged["benchmarks"] += part.get("benchmarks", [])
    return merged


def latest_results(results_dir: str) -> list[str]:
    """The newest full (not smoke, not filtered) run for the CPU and for each GPU in results_dir."""
    newest: dict[str, tuple[str, str]] = {}
    for path in glob.glob(os.path.join(results_dir, "*.json")):
        try:
            with open(path) as f:
                fa = json.load(f).get("fastadapters") or {}
        except (OSError, ValueError):
            continue
        if fa.get("mode") not in ("cpu", "gpu") or fa.get("subset"):
            continue
        kind = fa.get("gpu") or ""
        if kind not in newest or fa.get("date", "") > newest[kind][0]:
            newest[kind] = (fa.get("date", ""), path)
    return [newest[kind][1] for kind in sorted(newest)]  # the CPU run ("") first


def update_readme(results_dir: str, readme: str) -> None:
    from bench import report

    paths = latest_results(results_dir)
    runs = [(os.path.relpath(p, ROOT), report.load(p)) for p in paths]
    report.update_readme(readme, report.readme_block(runs))
    print(f"rewrote the Performance block of {readme} from {[r for r, _ in runs] or 'no results'}")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick", action="store_true", help="fewer rounds (min 3, max 0.25 s each): faster, noisier"
    )
    p.add_argument("--only", help="comma-separated bench file names, e.g. lora,train_step")
    p.add_argument("--filter", help="pytest -k expression selecting benchmarks inside the files")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one round: checks the pipeline")
    p.add_argument("--out", default=RESULTS_DIR, help="results folder (default bench/results)")
    p.add_argument("--max-time", type=float, default=1.0, help="pytest-benchmark --benchmark-max-time")
    p.add_argument("--min-rounds", type=int, default=5, help="pytest-benchmark --benchmark-min-rounds")
    p.add_argument("--file-timeout", type=int, default=900, help="seconds allowed for each bench file")
    p.add_argument("--budget", type=float, help="seconds for all files (bench/gpu_check.sh); fair shares")
    p.add_argument("--update-readme", action="store_true", help="rewrite README's Performance block")
    p.add_argument("--no-run", action="store_true", help="with --update-readme: do not run anything")
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("-v", "--verbose", action="store_true", help="print each file's pytest output")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_time, args.min_rounds = 0.0, 1
    elif args.quick:
        args.max_time, args.min_rounds = min(args.max_time, 0.25), min(args.min_rounds, 3)
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.no_run:
        if not args.update_readme:
            raise SystemExit("--no-run only makes sense with --update-readme")
        update_readme(args.out, args.readme)
        return 0
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    files = bench_files(only)
    sysinfo = system_info()
    machine = machine_name(sysinfo)
    now = datetime.datetime.now()
    mode = "smoke" if args.smoke else "gpu" if sysinfo["gpu"] else "cpu"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)  # time compiled kernels; the interpreter is for the tests
    env["FASTADAPTERS_BENCH_SMOKE"] = "1" if args.smoke else "0"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    print(f"benchmarks on {machine} ({mode}): {len(files)} files -> {args.out}", flush=True)

    start = time.time()
    parts, runs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(files):
            json_path = os.path.join(tmp, os.path.basename(path) + ".json")
            timeout = float(args.file_timeout)
            if args.budget is not None:
                left = args.budget - (time.time() - start)
                if left < 15:
                    runs.append({"file": os.path.basename(path), "status": "skipped (budget spent)", "rc": -1,
                                 "seconds": 0, "notes": []})  # fmt: skip
                    continue
                timeout = min(timeout, left, max(30.0, 2 * left / (len(files) - i)))
            run = run_file(path, args, env, json_path, timeout)
            part = read_part(json_path)
            if part is not None:
                run["count"] = len(part.get("benchmarks", []))
                parts.append(part)
                if not os.path.exists(json_path):
                    run["status"] += f" ({run['count']} results kept)"
            runs.append(run)

    results = merge(parts)
    results["fastadapters"] = {
        "schema": 1,
        "date": now.isoformat(timespec="seconds"),
        "machine": machine,
        "command": "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv),
        "mode": mode,
        "quick": args.quick,
        "subset": bool(only or args.filter),
        "gpu": sysinfo["gpu"],
        "system": sysinfo,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "runs": runs,
        "wall_s": round(time.time() - start, 1),
        "load_average_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"{now:%Y-%m-%d_%H%M}-{machine}" + ("-smoke" if args.smoke else ""))
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)

    from bench import report

    md, pngs = report.write_report(stem + ".json")
    print(f"wrote {stem}.json, {md}" + "".join(f", {p}" for p in pngs))
    print(f"total {time.time() - start:.0f} s")
    if args.update_readme:
        update_readme(args.out, args.readme)
    failed = [r["file"] for r in runs if r["rc"] not in (0, 5, -1)]
    if failed:
        print(f"bench files with failures: {failed} (see the report's Runs table)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
