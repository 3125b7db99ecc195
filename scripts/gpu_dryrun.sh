#!/usr/bin/env bash
# Rehearses bench/gpu_check.sh's core stage on a machine without a GPU, under the GPU machine's versions.
#   nice bash scripts/gpu_dryrun.sh          (under an hour on 2 busy cores; 2.7 GB more the first time)
# Steps, each timed; the run is GREEN when every one passes:
#   venv      - a Python 3.12 virtualenv in $DRYRUN_HOME (default ~/.cache/fastadapters-dryrun, outside the
#               tree; reused when present) with what the GPU machine has: torch==2.11.0 (the registry's
#               default build, CUDA 13.0: 2.7 GB of wheels), triton==3.6.0, transformers==5.17.0,
#               peft==0.21.2, safetensors, pytest, pytest-benchmark, and numpy<2.4 (the triton 3.6
#               interpreter fails with numpy >= 2.4). Not hypothesis, pytest-xdist, pytest-timeout: the
#               machine may lack them, so the wheelhouse must supply them;
#   tree      - a copy of the working tree (tracked and untracked files) in $DRYRUN_HOME/tree;
#   core      - `bench/gpu_check.sh core` in the copy with CUDA_HOME=/usr/local/cuda-13.0: machine,
#               wheelhouse, build (the CUDA extension compiled and linked for 8.0;9.0+PTX, not run), the five
#               op test files in the Triton interpreter (GPU_CHECK_TEST_DEVICE=cpu); no bench (no GPU);
#   aot       - tests/compile_kernels.py --all-configs: every Triton kernel variant the ops launch (every
#               dtype, op and autotune config) compiled for sm_90 by triton 3.6;
#   prefix    - tests/test_prefix_models.py under transformers 5.17 (the cache argument's name, and GPT-J's
#               refused attention switch: a clear error, its tests skipped);
#   fallback  - setup.py given a fake nvcc of another CUDA major (12.4), no nvcc at all, and a fake nvcc of
#               torch's major that cannot compile: each must end with an importable CPU-only fastadapters._C
#               and its log in build/fastadapters_ext.log.
# Writes $DRYRUN_HOME/summary.txt (and gpu_check's results in $DRYRUN_HOME/out). Too slow for `make test`.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HOME_DIR=${DRYRUN_HOME:-$HOME/.cache/fastadapters-dryrun}
VENV=$HOME_DIR/venv
TREE=$HOME_DIR/tree
OUTDIR=$HOME_DIR/out
SUMMARY=$HOME_DIR/summary.txt
TOOLKIT=${DRYRUN_CUDA_HOME:-/usr/local/cuda-13.0}
mkdir -p "$HOME_DIR"
: >"$SUMMARY"
START=$SECONDS
RED=0

# run NAME COMMAND...: runs a step, prints and records its time and status.
run() {
    local name=$1
    shift
    echo "=== $name $(date -u +%H:%M:%S)"
    local t0=$SECONDS
    "$@"
    local rc=$?
    local status=ok
    if ((rc != 0)); then
        status="FAILED (rc $rc)"
        RED=1
    fi
    printf '%-9s %-16s %5d s\n' "$name" "$status" "$((SECONDS - t0))" | tee -a "$SUMMARY"
    return $rc
}

python312() {
    local candidate
    for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
        if "$candidate" -c "" 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    return 1
}

venv() {
    local py=$VENV/bin/python
    if [[ ! -x $py ]]; then
        local base
        base=$(python312) || {
            echo "no working python3.12"
            return 1
        }
        "$base" -m venv "$VENV" || return 1
    fi
    "$py" -m pip install -q --disable-pip-version-check torch==2.11.0 triton==3.6.0 transformers==5.17.0 \
        peft==0.21.2 "numpy<2.4" safetensors pytest pytest-benchmark 2>&1 | grep -v "^WARNING: Location" || true
    "$py" - <<'EOF'
import importlib.metadata as md, importlib.util, sys, torch
expected = {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "peft": "0.21.2"}
found = {name: md.version(name).split("+")[0] for name in expected}
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      ", ".join(f"{k} {v}" for k, v in found.items() if k != "torch"), f", numpy {md.version('numpy')}")
extra = [m for m in ("hypothesis", "xdist", "pytest_timeout") if importlib.util.find_spec(m)]
assert found == expected, f"versions {found}, expected {expected}"
assert sys.version_info[:2] == (3, 12) and torch.version.cuda and torch.version.cuda.startswith("13.")
assert tuple(int(x) for x in md.version("numpy").split(".")[:2]) < (2, 4), "numpy must be < 2.4"
assert not extra, f"{extra} installed in the venv: the GPU machine may lack them (pip uninstall them)"
EOF
}

tree() {
    rm -rf "$TREE"
    mkdir -p "$TREE"
    (cd "$ROOT" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$TREE" || return 1
    ln -s ../kernels "$TREE/fastadapters/kernels"
    du -sh "$TREE" | cut -f1
}

core() {
    rm -rf "$OUTDIR" "$HOME_DIR/work"
    (
        cd "$TREE" || exit 1
        CUDA_HOME=$TOOLKIT PYTHON=$VENV/bin/python OUT=$OUTDIR GPU_CHECK_WORK=$HOME_DIR/work \
            GPU_CHECK_TEST_DEVICE=cpu GPU_CHECK_CORE_BUDGET=1800 GPU_CHECK_BUILD_CAP=600 GPU_CHECK_TESTS_CAP=1200 \
            GPU_CHECK_SKIP=core_bench bash bench/gpu_check.sh core
    ) >"$HOME_DIR/core.log" 2>&1
    grep -E "^== |^wheelhouse:|fastadapters._C (built|available)|passed|failed" "$HOME_DIR/core.log" | tail -n 20
    # Green: every step ok, the CUDA part built, the op tests all passed.
    "$VENV/bin/python" - "$OUTDIR/gpu_check.json" "$TREE/build/fastadapters_ext.log" <<'EOF'
import json, sys
summary, log = json.load(open(sys.argv[1])), open(sys.argv[2]).read()
bad = [s for s in summary["steps"] if s["status"] not in ("ok", "skipped (GPU_CHECK_SKIP)")]
tests = summary.get("core_tests", {})
print("op tests:", {k: tests.get(k) for k in ("tests", "passed", "skipped", "failed")})
for failure in tests.get("failures", [])[:20]:
    print("  FAILED", failure)
assert not bad, f"steps not ok: {bad}"
assert "fastadapters._C built: CPU + CUDA" in log, log[-3000:]
assert tests.get("passed", 0) > 0 and tests.get("failed", 1) == 0, tests
EOF
}

aot() {
    (cd "$TREE" && PYTHONPATH=$TREE "$VENV/bin/python" tests/compile_kernels.py --all-configs) \
        >"$HOME_DIR/aot.log" 2>&1
    local rc=$?
    grep -E "^FAILED" "$HOME_DIR/aot.log" | head -n 20
    tail -n 1 "$HOME_DIR/aot.log"
    return $rc
}

prefix() {
    (cd "$TREE" && PYTHONPATH=$TREE:$HOME_DIR/work/site "$VENV/bin/python" -m pytest tests/test_prefix_models.py \
        -q -p no:cacheprovider -o addopts= -rs) >"$HOME_DIR/prefix.log" 2>&1
    local rc=$?
    grep -E "^(SKIPPED|FAILED)|passed|failed" "$HOME_DIR/prefix.log" | tail -n 8
    return $rc
}

# fallback_case NAME NVCC_SCRIPT EXPECTED: builds with CUDA_HOME=a temp folder whose bin/nvcc is NVCC_SCRIPT
# (none when empty); the log must contain EXPECTED and say "CPU only", and the CPU-only _C must import.
fallback_case() {
    local name=$1 script=$2 expected=$3 home=$HOME_DIR/cuda-$1
    rm -rf "$home"
    mkdir -p "$home/bin"
    if [[ -n $script ]]; then
        printf '#!/bin/sh\n%s\n' "$script" >"$home/bin/nvcc"
        chmod +x "$home/bin/nvcc"
    fi
    (
        cd "$TREE" || exit 1
        rm -f build/fastadapters_ext.log fastadapters/_C*.so
        CUDA_HOME=$home MAX_JOBS=2 "$VENV/bin/python" setup.py -q build_ext --inplace >"$HOME_DIR/fallback-$name.log" 2>&1
        echo "  $name: $(grep -m1 "CUDA part" build/fastadapters_ext.log) -> $(tail -n 1 build/fastadapters_ext.log)"
        grep -q -- "$expected" build/fastadapters_ext.log && grep -q "fastadapters._C built: CPU only" build/fastadapters_ext.log &&
            PYTHONPATH=$TREE "$VENV/bin/python" -c "
import warnings; warnings.simplefilter('ignore')
import fastadapters._C
from fastadapters import _ext
assert _ext.AVAILABLE and not _ext.has_cuda(), (_ext.AVAILABLE, _ext.ERROR)
print('  importable, CPU-only:', fastadapters._C.__file__.rsplit('/', 1)[-1])"
    )
}

fallback() {
    local ok=0
    fallback_case other-major 'echo "Cuda compilation tools, release 12.4, V12.4.131"' "majors differ" || ok=1
    fallback_case no-nvcc "" "no working nvcc" || ok=1
    fallback_case broken 'case "$*" in *--version*) echo "Cuda compilation tools, release 13.0, V13.0.88";;
*) echo "fake nvcc: cannot compile" >&2; exit 1;; esac' "retrying with the CPU part alone" || ok=1
    return $ok
}

echo "gpu_dryrun: $HOME_DIR, toolkit $TOOLKIT"
run venv venv && run tree tree && {
    run core core
    run aot aot
    run prefix prefix
    run fallback fallback
}
if ((RED)); then verdict=RED; else verdict=GREEN; fi
echo "total     $verdict $((SECONDS - START)) s" | tee -a "$SUMMARY"
echo "gpu_dryrun: $verdict; summary in $SUMMARY, logs in $HOME_DIR"
exit $RED
