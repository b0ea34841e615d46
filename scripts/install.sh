#!/usr/bin/env bash
# Set up headlab from nothing into ./.venv (idempotent): CPU torch first, held by a constraint so
# that no other package pulls a CUDA build, then headlab with its dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${TORCH_VERSION}" > "$constraints"
.venv/bin/pip install -q "torch==${TORCH_VERSION}"
.venv/bin/pip install -q -c "$constraints" -e ".[dev]"
.venv/bin/python -c "import torch, headlab; print('headlab', headlab.__version__, 'torch', torch.__version__)"
