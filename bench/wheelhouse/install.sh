#!/usr/bin/env bash
# Installs, offline, the wheels of this folder whose module PYTHON lacks, into TARGET (a folder to put on
# PYTHONPATH, TARGET/bin on PATH): the GPU machine has no network, and may lack the test tools.
#   bash bench/wheelhouse/install.sh PYTHON TARGET
# A module PYTHON already imports (a `ninja` already on PATH) is left alone, so nothing the machine has is
# replaced or shadowed. Prints one line: what was installed and what was already there.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PY=$1
TARGET=$2
mkdir -p "$TARGET"
# module:distribution (a wheel's file name starts with the distribution, '-' as '_')
missing=() present=()
for pair in hypothesis:hypothesis sortedcontainers:sortedcontainers xdist:pytest_xdist execnet:execnet \
    pytest_timeout:pytest_timeout ninja:ninja; do
    module=${pair%%:*} dist=${pair#*:}
    if [[ $module == ninja ]] && command -v ninja >/dev/null; then
        present+=(ninja)
    elif [[ $module != ninja ]] && "$PY" -c "import $module" 2>/dev/null; then
        present+=("$module")
    else
        missing+=("$(ls "$HERE"/"$dist"-*.whl)")
    fi
done
if ((${#missing[@]})); then
    "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
        --find-links "$HERE" --target "$TARGET" "${missing[@]}" || exit 1
fi
names=("${missing[@]##*/}")
echo "wheelhouse: installed [${names[*]%%-*}] into $TARGET; already there [${present[*]}]"
