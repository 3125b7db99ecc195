#!/usr/bin/env bash
# The check for a machine with a GPU, offline, in two stages:   bash bench/gpu_check.sh [core|extended|all]
#   core (GPU_CHECK_CORE_BUDGET seconds, default 230), which must always report:
#     machine   - python and package versions, nvidia-smi;
#     wheelhouse- the test tools the machine lacks (hypothesis, pytest-xdist, pytest-timeout, ninja) installed
#                 offline from bench/wheelhouse into a folder on PYTHONPATH; nothing the machine has is replaced;
#     build     - fastadapters._C in place (`setup.py build_ext --inplace`; CUDA kernels where setup.py finds an
#                 nvcc of torch's CUDA major, else CPU-only: its log says why), then PYTHONPATH=repo root;
#     tests     - the five op test files on CUDA (xdist when there, --timeout per test, FASTADAPTERS_AUTOTUNE=0),
#                 each result in the log as it finishes, and a junit XML;
#     bench     - every op at one realistic shape against its reference and PEFT, achieved GB/s and TFLOP/s
#                 against the copy and matmul ceilings measured in the same run (first autotune config).
#   extended (GPU_CHECK_EXTENDED_BUDGET seconds, default 420): the whole test suite, then the full benchmarks
#     (autotuned), for what time is left.
# Results go to $OUT (else bench/results/gpu_check-<date>) as each step ends, so a timeout keeps what finished:
#   gpu_check.log (every step's output), gpu_check.json (each step's status and time, the versions, the test
#   counts and failures; rewritten after every step), core_tests.xml, core_bench.{json,md}, extended_tests.xml,
#   extended_bench.{json,md}.
# GPU_CHECK_BUILD_CAP / GPU_CHECK_TESTS_CAP (default 120 / 110 s) cap the core build and tests steps;
# GPU_CHECK_SKIP=step,... skips steps. PYTHON defaults to python3.12 where it runs, else python3.
# CUDA_HOME, when unset, is the first of /usr/local/cuda and /usr/local/cuda-* that has bin/nvcc and
# include/cuda_runtime.h. A failing step is recorded and the script goes on. scripts/gpu_dryrun.sh rehearses
# the core stage on a CPU machine.
set -uo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
WHAT=${1:-all}
case $WHAT in core | extended | all) ;; *)
    echo "usage: bash bench/gpu_check.sh [core|extended|all] (got '$WHAT')" >&2
    exit 2
    ;;
esac
if [[ -z ${PYTHON:-} ]]; then
    PYTHON=python3
    python3.12 -c "" 2>/dev/null && PYTHON=python3.12
fi
OUT=${OUT:-$ROOT/bench/results/gpu_check-$(date +%Y-%m-%d_%H%M)}
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/fastadapters-gpu-check}
mkdir -p "$OUT" "$WORK/logs"
LOG=$OUT/gpu_check.log
STEPS=$WORK/steps.tsv
[[ $WHAT == extended ]] || : >"$STEPS"
touch "$STEPS"
SITE=$WORK/site
export PYTHONPATH=$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}
export PATH=$SITE/bin:$PATH
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
if [[ -z ${CUDA_HOME:-} ]]; then
    for home in /usr/local/cuda /usr/local/cuda-*; do
        if [[ -x $home/bin/nvcc && -e $home/include/cuda_runtime.h ]]; then
            export CUDA_HOME=$home
            break
        fi
    done
fi
JOBS=$(nproc)
XDIST_WORKERS=${GPU_CHECK_WORKERS:-$((JOBS < 8 ? JOBS : 8))}
OP_TESTS="tests/test_lora.py tests/test_bottleneck.py tests/test_multi_lora.py tests/test_prefix_attention.py
    tests/test_extension.py"
# One realistic shape per op (the GPU shapes of bench/bench_*.py), every provider, and the two ceilings.
CORE_FILTER='copy or matmul or (d4096 and N4096 and r16 and not p0.05) or N8192 or (prefill and S128)
    or (S2048 and P64)'

# step NAME BUDGET_END CAP RESERVE COMMAND...: runs COMMAND under timeout (at most CAP seconds, and never past
# BUDGET_END minus RESERVE, the time kept for the stage's later steps), appends its output to gpu_check.log,
# records its status, then rewrites gpu_check.json.
step() {
    local name=$1 end=$2 cap=$3 reserve=$4
    shift 4
    local left=$((end - SECONDS - reserve))
    local limit=$((cap < left ? cap : left))
    if [[ ,${GPU_CHECK_SKIP:-}, == *,$name,* ]]; then
        printf '%s\tskipped (GPU_CHECK_SKIP)\t-\t0\t-\n' "$name" >>"$STEPS"
    elif ((limit < 10)); then
        printf '%s\tskipped (no time left)\t-\t0\t%s\n' "$name" "$limit" >>"$STEPS"
        echo "== $name: skipped, no time left" | tee -a "$LOG"
    else
        echo "== $name (limit ${limit} s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
        local t0=$SECONDS
        # The steps are shell functions, run by timeout in a child bash (they are exported below).
        timeout -k 10 "$limit" bash -c '"$@"' step "$@" 2>&1 | tee -a "$LOG" >"$WORK/logs/$name.log"
        local rc=${PIPESTATUS[0]} status=ok
        if ((rc == 124 || rc == 137)); then
            status="timeout after ${limit} s"
        elif ((rc != 0)); then
            status="failed (rc $rc)"
        fi
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - t0))" "$limit" >>"$STEPS"
        tail -n 6 "$WORK/logs/$name.log"
        echo "== $name: $status in $((SECONDS - t0)) s" | tee -a "$LOG"
    fi
    summarize
}

machine() {
    nvidia-smi || echo "nvidia-smi: not available"
    "$PY" - "$WORK/machine.json" <<'EOF'
import importlib.metadata as md, json, os, platform, shutil, sys, torch
info = {"python": platform.python_version(), "executable": sys.executable, "torch": torch.__version__,
        "torch_cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "CUDA_HOME": os.environ.get("CUDA_HOME"), "ninja_on_path": shutil.which("ninja")}
for name in ("triton", "transformers", "peft", "safetensors", "accelerate", "numpy", "setuptools", "pytest",
             "pytest-benchmark", "pytest-xdist", "pytest-timeout", "hypothesis", "ninja"):
    try:
        info[name] = md.version(name)
    except md.PackageNotFoundError:
        info[name] = None
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"), indent=1)
EOF
}

wheelhouse() {
    bash bench/wheelhouse/install.sh "$PY" "$SITE"
}

build() {
    export MAX_JOBS=${MAX_JOBS:-$JOBS}
    echo "CUDA_HOME=${CUDA_HOME:-unset} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-unset}"
    rm -f build/fastadapters_ext.log
    "$PY" setup.py -q build_ext --inplace || echo "setup.py build_ext failed (rc $?)"
    echo "--- build/fastadapters_ext.log"
    tail -n 40 build/fastadapters_ext.log || echo "no build log"
    "$PY" - <<'EOF'
import warnings
warnings.simplefilter("ignore")
import torch
from fastadapters import _ext
print("fastadapters._C available:", _ext.AVAILABLE, "| CUDA kernels:", _ext.has_cuda(), "|", _ext.ERROR or "")
raise SystemExit(0 if _ext.AVAILABLE and (_ext.has_cuda() or not torch.cuda.is_available()) else 1)
EOF
}

# run_tests XML PER_TEST_TIMEOUT TARGETS...: pytest on CUDA, one line per finished test (-v), junit XML.
run_tests() {
    local xml=$1 per_test=$2
    shift 2
    local opts=()
    if "$PY" -c "import xdist" 2>/dev/null; then opts+=(-n "$XDIST_WORKERS" --dist load); fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then opts+=(--timeout "$per_test"); fi
    # FASTADAPTERS_AUTOTUNE=0: the Triton kernels take their first config instead of timing every one at every
    # test shape (the tests check results; the full bench autotunes).
    # shellcheck disable=SC2068  # the targets are words
    # GPU_CHECK_TEST_DEVICE=cpu (scripts/gpu_dryrun.sh): the same tests in the Triton interpreter.
    FASTADAPTERS_TEST_DEVICE=${GPU_CHECK_TEST_DEVICE:-cuda} FASTADAPTERS_AUTOTUNE=0 "$PY" -m pytest $@ -o addopts= -v -rfE \
        -p no:cacheprovider --benchmark-disable --durations=15 --junitxml="$xml" "${opts[@]}"
}

core_tests() {
    run_tests "$OUT/core_tests.xml" 60 "$OP_TESTS"
}

extended_tests() {
    run_tests "$OUT/extended_tests.xml" 300 tests
}

# run_bench NAME BUDGET ARGS...: python -m bench into $WORK/NAME, then its JSON and report to $OUT/NAME.*
run_bench() {
    local name=$1 budget=$2
    shift 2
    rm -rf "${WORK:?}/$name"
    "$PY" -m bench --out "$WORK/$name" --budget "$budget" "$@"
    local rc=$?
    local json
    json=$(ls -t "$WORK/$name"/*.json 2>/dev/null | head -n 1)
    if [[ -n $json ]]; then
        cp "$json" "$OUT/$name.json"
        cp "${json%.json}.md" "$OUT/$name.md" 2>/dev/null
        cat "${json%.json}.md" 2>/dev/null
    fi
    return $rc
}

core_bench() {
    FASTADAPTERS_AUTOTUNE=0 run_bench core_bench "$1" --quick --max-time 0.3 \
        --only ceilings,lora,bottleneck,multi_lora,prefix_attention --filter "$(echo $CORE_FILTER)"
}

extended_bench() {
    run_bench extended_bench "$1" --max-time 0.5 --min-rounds 3
}

# gpu_check.json: the steps so far, the versions, the tests' counts and failures, the bench reports.
summarize() {
    "$PY" - "$OUT" "$WORK" "$SECONDS" <<'EOF' || echo "summary failed" | tee -a "$LOG"
import json, os, re, sys, xml.etree.ElementTree as ET
out, work, total = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps = []
for line in open(os.path.join(work, "steps.tsv")):
    name, status, rc, seconds, limit = line.rstrip("\n").split("\t")
    steps.append({"step": name, "status": status, "rc": rc, "seconds": int(seconds), "limit_s": limit})
summary = {"total_s": total, "steps": steps}
try:
    summary["machine"] = json.load(open(os.path.join(work, "machine.json")))
except (OSError, ValueError):
    pass
for stage in ("core", "extended"):
    xml, log = os.path.join(out, f"{stage}_tests.xml"), os.path.join(work, "logs", f"{stage}_tests.log")
    if os.path.exists(xml):
        try:
            root = ET.parse(xml).getroot()
            cases = list(root.iter("testcase"))
            bad = [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
            skipped = [c for c in cases if c.find("skipped") is not None]
            summary[f"{stage}_tests"] = {
                "tests": len(cases), "failed": len(bad), "skipped": len(skipped),
                "passed": len(cases) - len(bad) - len(skipped),
                "failures": [f"{c.get('classname')}::{c.get('name')}: "
                             + ((c.find("failure") if c.find("failure") is not None else c.find("error"))
                                .get("message") or "")[:300] for c in bad][:60]}
            continue
        except ET.ParseError:
            pass
    if os.path.exists(log):  # killed before pytest wrote the XML: count the -v lines that finished
        text = open(log, errors="replace").read()
        found = re.findall(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b.*?(tests/\S+)", text)
        found += [(s, t) for t, s in re.findall(r"(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", text)]
        counts = {}
        for status, _ in found:
            counts[status] = counts.get(status, 0) + 1
        summary[f"{stage}_tests"] = {"from_log": counts, "failures": sorted({t for s, t in found
                                     if s in ("FAILED", "ERROR")})[:60], "log_tail": text.splitlines()[-3:]}
for name in ("core_bench", "extended_bench"):
    path = os.path.join(out, name + ".json")
    if os.path.exists(path):
        runs = json.load(open(path)).get("fastadapters", {}).get("runs", [])
        summary[name] = {"report": name + ".md", "files": runs}
json.dump(summary, open(os.path.join(out, "gpu_check.json"), "w"), indent=1)
EOF
}

export -f machine wheelhouse build run_tests core_tests extended_tests run_bench core_bench extended_bench
export PY=$PYTHON OUT WORK SITE JOBS XDIST_WORKERS OP_TESTS CORE_FILTER
# fastadapters.kernels is the top-level kernels/ folder (setup.py maps it); without an install, link it.
KERNELS_LINK=""
if ! "$PY" -c "import fastadapters.kernels" 2>/dev/null && [[ ! -e fastadapters/kernels ]]; then
    ln -s ../kernels fastadapters/kernels && KERNELS_LINK=$ROOT/fastadapters/kernels
fi
cleanup() { if [[ -n $KERNELS_LINK ]]; then rm -f "$KERNELS_LINK"; fi; }
trap cleanup EXIT

if [[ $WHAT != extended ]]; then
    END=$((SECONDS + ${GPU_CHECK_CORE_BUDGET:-230}))
    echo "gpu_check core: budget $((END - SECONDS)) s, python $PY, results in $OUT" | tee -a "$LOG"
    step machine "$END" 30 200 machine
    step wheelhouse "$END" 30 190 wheelhouse
    step build "$END" "${GPU_CHECK_BUILD_CAP:-120}" 140 build
    step core_tests "$END" "${GPU_CHECK_TESTS_CAP:-110}" 70 core_tests
    BENCH_LIMIT=$((END - SECONDS - 5))
    step core_bench "$END" "$BENCH_LIMIT" 0 core_bench "$((BENCH_LIMIT - 15))"
fi
if [[ $WHAT != core ]]; then
    END=$((SECONDS + ${GPU_CHECK_EXTENDED_BUDGET:-420}))
    echo "gpu_check extended: budget $((END - SECONDS)) s" | tee -a "$LOG"
    if [[ $WHAT == extended ]]; then # the core stage ran earlier in this machine's session (same $WORK)
        step wheelhouse "$END" 30 360 wheelhouse
    fi
    step extended_tests "$END" 240 150 extended_tests
    BENCH_LIMIT=$((END - SECONDS - 5))
    step extended_bench "$END" "$BENCH_LIMIT" 0 extended_bench "$((BENCH_LIMIT - 20))"
fi
echo "gpu_check $WHAT: $SECONDS s; results in $OUT" | tee -a "$LOG"
