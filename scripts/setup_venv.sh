#!/usr/bin/env bash
# Creates the virtual environment and installs fastadapters with its test and bench tools.
# A machine whose python already has torch (a GPU machine) keeps that torch: the venv then
# sees the system site-packages. Elsewhere the CPU build torch==2.13.0 is installed.
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
else
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "${PIP[@]}" torch==2.13.0
fi
if ! "$VENV/bin/python" -c "import triton" 2>/dev/null; then
    # 3.8.x lies on local disk; it is also what the CUDA build of torch 2.14 asks for.
    "${PIP[@]}" "triton==3.8.*"
fi
# The ranges of pyproject.toml's dependencies (tested: this CPU set and the GPU machine's, see there).
"${PIP[@]}" "transformers>=5.17,<5.25" "safetensors>=0.8,<0.9" "peft>=0.21,<0.22" "accelerate>=1.16,<1.17" \
    pytest pytest-benchmark pytest-xdist pytest-timeout hypothesis ruff ninja matplotlib \
    fastapi uvicorn prometheus-client openai httpx
"${PIP[@]}" -e . --no-build-isolation
