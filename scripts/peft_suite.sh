#!/usr/bin/env bash
# PEFT's own LoRA tests, run twice: as they are, and with fastadapters.accelerate on every tuner PEFT builds.
# Reports the pass -> fail list and the share of LoRA forward calls that ran a fastadapters op, per layer
# type, in bench/results/<date>-<host>-peft-suite.{md,json}.
#
# usage: scripts/peft_suite.sh [EVERY]
#   EVERY   run every EVERY-th selected test (default 4; 1 = all of them, a few hours on 2 cores)
# env: PYTHON (default .venv/bin/python), WORKERS (pytest-xdist workers, default 2), TIMEOUT (s per test,
#      default 300), FA_SUITE_CACHE (default ~/.cache/fastadapters-peft-suite), FA_SUITE_FILES (the test files),
#      FA_SUITE_PLAIN (a previous run's plain/ folder with the same EVERY and files: its outcomes are reused,
#      since the plain run does not depend on fastadapters)
#
# PEFT's source distribution comes from the package registry (pip download, for the installed peft
# version) into the cache folder, outside the tree. PEFT's tests import a few packages fastadapters does not
# need (datasets, diffusers, parameterized, scipy); they are installed there too (pip --target, --no-deps),
# never into the virtualenv.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
EVERY=${1:-4}
WORKERS=${WORKERS:-2}
TIMEOUT=${TIMEOUT:-300}
CACHE=${FA_SUITE_CACHE:-$HOME/.cache/fastadapters-peft-suite}
if ! [[ $EVERY =~ ^[1-9][0-9]*$ ]]; then
  echo "peft_suite.sh: EVERY must be a positive integer, got '$EVERY'" >&2
  exit 2
fi
VERSION=$("$PYTHON" -c "import peft; print(peft.__version__)")
SRC=$CACHE/peft-$VERSION
mkdir -p "$CACHE"
if [ ! -d "$SRC/tests" ]; then
  "$PYTHON" -m pip download "peft==$VERSION" --no-deps --no-binary :all: -d "$CACHE" -q
  tar -xzf "$CACHE/peft-$VERSION.tar.gz" -C "$CACHE"
fi
touch "$SRC/tests/__init__.py"  # the sdist omits it; the tests import each other relatively
DEPS=$CACHE/deps
if [ ! -d "$DEPS/diffusers" ]; then
  "$PYTHON" -m pip install -q --target "$DEPS" --no-deps datasets diffusers parameterized scipy pyarrow dill \
    multiprocess xxhash pandas requests urllib3 idna charset_normalizer certifi importlib_metadata zipp httpx \
    httpcore h11 anyio sniffio python-dateutil six tzdata pytz
fi

# The LoRA tests that need no hub download (those fail in both runs and say nothing): PEFT's custom-model
# tests (every LoRA layer type, merging, adapters, saving) and the LoRA-specific files.
FILES=${FA_SUITE_FILES:-"tests/test_custom_models.py tests/test_mixed.py tests/test_helpers.py
  tests/test_low_level_api.py tests/test_lora_variants.py tests/test_target_parameters.py tests/test_other.py
  tests/test_lorafa.py tests/test_loraplus.py tests/test_lora_intruders.py tests/test_integrations.py
  tests/test_tuners_utils.py tests/test_trainable_tokens.py"}
STAMP=$(date -u +%Y-%m-%d_%H%M)
WORK=$CACHE/runs/$STAMP
mkdir -p "$WORK" bench/results
MODES="plain accelerated"
if [ -n "${FA_SUITE_PLAIN:-}" ]; then
  mkdir -p "$WORK/plain" && cp "$FA_SUITE_PLAIN/outcomes.json" "$WORK/plain/"
  MODES=accelerated
fi
for MODE in $MODES; do
  echo "peft_suite.sh: $MODE run (every $EVERY-th LoRA test, $WORKERS workers)" >&2
  (cd "$SRC" && FA_SUITE_MODE=$MODE FA_SUITE_OUT=$WORK/$MODE FA_SUITE_EVERY=$EVERY HF_HUB_OFFLINE=1 \
    PYTHONPATH=$ROOT/scripts:$DEPS nice -n 10 "$PYTHON" -m pytest $FILES -k lora -p peft_suite_plugin \
    -o addopts="" -p no:cacheprovider -q -n "$WORKERS" --timeout "$TIMEOUT" >"$WORK/$MODE.log" 2>&1) || true
  tail -n 1 "$WORK/$MODE.log" >&2
done
HOST=$(hostname -s 2>/dev/null || echo host)
"$PYTHON" scripts/peft_suite_report.py "$WORK/plain" "$WORK/accelerated" "bench/results/$STAMP-$HOST-peft-suite" \
  --meta "peft=$VERSION" "every=$EVERY" "files=$(echo $FILES | tr -s ' \n' ' ')" \
  "commit=$(git rev-parse --short HEAD 2>/dev/null || echo none)"
