#!/usr/bin/env bash
# The one command for a machine with a GPU, in under 8 minutes (GPU_CHECK_BUDGET seconds, default 460):
#   1. build   - builds fastadapters._C with its CUDA kernels in place, with the machine's own python
#                (no install, no network: `setup.py build_ext --inplace`, then PYTHONPATH=repo root);
#   2. tests   - runs the test suite on CUDA (FASTADAPTERS_TEST_DEVICE=cuda, TRITON_INTERPRET unset);
#   3. bench   - runs the benchmark suite at its GPU shapes (`python -m bench`: CUDA-event timing,
#                copy-bandwidth and bf16-matmul ceilings measured in the same run);
#   4. summary - writes gpu_check.json and gpu_check.md (each stage's status and time) next to the
#                benchmark JSON + markdown + PNGs, in $OUT (else bench/results/).
# Every stage runs under `timeout`; a failing stage is recorded and the script goes on.
# Usage: bash bench/gpu_check.sh          (PYTHON=python3.12 to pick the interpreter)
# Dry run of the flow on a CPU machine: GPU_CHECK_SKIP=build GPU_CHECK_TESTS=tests/test_bench.py
#   GPU_CHECK_BENCH_ARGS="--smoke --only ceilings" PYTHON=.venv/bin/python OUT=/tmp/gc bash bench/gpu_check.sh
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/bench/results}
BUDGET=${GPU_CHECK_BUDGET:-460}
LOGS=$OUT/gpu_check_logs
STATUS=$LOGS/stages.tsv
mkdir -p "$LOGS"
: >"$STATUS"
START=$SECONDS
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET

# stage NAME CAP_SECONDS RESERVE_SECONDS COMMAND...: runs COMMAND under timeout (at most CAP, and
# never into the RESERVE left for later stages), logs to $LOGS/NAME.log, appends a status line.
stage() {
    local name=$1 cap=$2 reserve=$3
    shift 3
    if [[ ,${GPU_CHECK_SKIP:-}, == *,$name,* ]]; then
        printf '%s\tskipped (GPU_CHECK_SKIP)\t-\t0\t-\n' "$name" >>"$STATUS"
        return
    fi
    local left=$((BUDGET - (SECONDS - START) - reserve))
    local limit=$((cap < left ? cap : left))
    local log=$LOGS/$name.log
    if ((limit < 15)); then
        printf '%s\tskipped (no time left)\t-\t0\t%s\n' "$name" "$limit" >>"$STATUS"
        echo "== $name: skipped, no time left"
        return
    fi
    echo "== $name (limit ${limit} s)"
    local t0=$SECONDS
    # The stages are shell functions: timeout runs them in a child bash (they are exported below).
    timeout -k 10 "$limit" bash -c '"$@"' stage "$@" >"$log" 2>&1
    local rc=$?
    local status=ok
    if ((rc == 124 || rc == 137)); then
        status="timeout after ${limit} s"
    elif ((rc != 0)); then
        status="failed (rc $rc)"
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" >>"$STATUS"
    tail -n 8 "$log"
    echo "== $name: $status in $((SECONDS - t0)) s"
}

machine() {
    nvidia-smi || true
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for name in ("triton", "transformers", "peft", "accelerate", "pytest", "pytest-benchmark", "pytest-xdist",
             "setuptools", "ninja"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
}

KERNELS_LINK=""
cleanup() { [[ -n $KERNELS_LINK ]] && rm -f "$KERNELS_LINK"; }
trap cleanup EXIT

build() {
    export MAX_JOBS=${MAX_JOBS:-$(nproc)}
    rm -f build/fastadapters_ext.log
    "$PY" setup.py build_ext --inplace || echo "setup.py build_ext failed (rc $?)"
    cat build/fastadapters_ext.log 2>/dev/null | tail -n 30
    "$PY" - <<'EOF'
import warnings
warnings.simplefilter("ignore")
import torch
from fastadapters import _ext
print("fastadapters._C available:", _ext.AVAILABLE, "| CUDA kernels:", _ext.has_cuda(), "|", _ext.ERROR or "")
raise SystemExit(0 if _ext.AVAILABLE and (_ext.has_cuda() or not torch.cuda.is_available()) else 1)
EOF
}

tests() {
    local xdist=()
    if "$PY" -c "import xdist" 2>/dev/null; then xdist=(-n 4 --dist loadfile); fi
    # shellcheck disable=SC2086  # GPU_CHECK_TESTS is a list of pytest targets
    # FASTADAPTERS_AUTOTUNE=0: the Triton kernels take their first config instead of timing every one at
    # every test shape (the tests check results; the bench stage autotunes).
    FASTADAPTERS_TEST_DEVICE=cuda FASTADAPTERS_AUTOTUNE=0 "$PY" -m pytest ${GPU_CHECK_TESTS:-tests} -q -ra -p no:cacheprovider --benchmark-disable \
        --durations=15 --junitxml="$LOGS/tests.xml" "${xdist[@]}"
}

bench() {
    # shellcheck disable=SC2086  # GPU_CHECK_BENCH_ARGS holds extra options
    "$PY" -m bench --out "$OUT" --budget "$1" --max-time 0.5 --min-rounds 3 ${GPU_CHECK_BENCH_ARGS:-}
}

export -f machine build tests bench
export PY OUT LOGS ROOT
stage machine 30 420 machine
# fastadapters.kernels is the top-level kernels/ folder (setup.py maps it); without an install, link it.
if ! "$PY" -c "import fastadapters.kernels" 2>/dev/null && [[ ! -e fastadapters/kernels ]]; then
    ln -s ../kernels fastadapters/kernels && KERNELS_LINK=$ROOT/fastadapters/kernels
fi
stage build 180 260 build
stage tests 150 120 tests
BENCH_LEFT=$((BUDGET - (SECONDS - START) - 25))
stage bench "$BENCH_LEFT" 20 bench "$((BENCH_LEFT - 15))"

# Summary: gpu_check.json / gpu_check.md with each stage's status, the test counts and the bench report.
"$PY" - "$OUT" "$STATUS" "$((SECONDS - START))" <<'EOF'
import glob, json, os, re, sys, xml.etree.ElementTree as ET
out, status_path, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
logs = os.path.dirname(status_path)
stages = []
for line in open(status_path):
    name, status, rc, seconds, limit = line.rstrip("\n").split("\t")
    stages.append({"stage": name, "status": status, "rc": rc, "seconds": int(seconds), "limit_s": limit,
                   "log": os.path.relpath(os.path.join(logs, name + ".log"), out)})
tests = {}
try:
    suite = ET.parse(os.path.join(logs, "tests.xml")).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                       if c.find("failure") is not None or c.find("error") is not None][:50]
except (OSError, ET.ParseError, AttributeError):
    log = os.path.join(logs, "tests.log")
    if os.path.exists(log):
        tail = open(log, errors="replace").read().splitlines()[-3:]
        tests = {"log_tail": tail}
candidates = [p for p in glob.glob(os.path.join(out, "*.json")) if not os.path.basename(p).startswith("gpu_check")]
bench_json = max(candidates, key=os.path.getmtime, default=None)
summary = {"total_s": total, "stages": stages, "tests": tests,
           "bench_results": os.path.basename(bench_json) if bench_json else None}
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
md = ["# gpu_check", "", f"Total {total} s.", "", "| stage | status | time | limit | log |", "|---|---|---|---|---|"]
md += [f"| {s['stage']} | {s['status']} | {s['seconds']} s | {s['limit_s']} s | {s['log']} |" for s in stages]
md += ["", "## Tests on CUDA", "", "```", json.dumps(tests, indent=1), "```", ""]
if bench_json:
    report = os.path.splitext(bench_json)[0] + ".md"
    md += [f"## Benchmarks ({os.path.basename(bench_json)})", ""]
    if os.path.exists(report):
        md += [re.sub(r"^#", "##", line) for line in open(report).read().splitlines()[1:]]
open(os.path.join(out, "gpu_check.md"), "w").write("\n".join(md) + "\n")
print("\n".join(md[:12 + len(stages)]))
EOF
echo "gpu_check: $((SECONDS - START)) s; results in $OUT"
