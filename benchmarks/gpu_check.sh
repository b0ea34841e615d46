#!/usr/bin/env bash
# The GPU check: on a CUDA machine, in under 8 minutes, (1) the compiled Triton kernels against eager
# (the GPU-only tests of tests/test_triton.py and tests/test_score_edit.py, without the interpreter) and
# (2) benchmarks/attention_kernels.py for Qwen3-14B and Llama attention shapes at T = 1k, 4k, 16k, 32k.
# Writes benchmarks/results/kernels_gpu.json, kernels_gpu.md (the table for the README) and
# gpu_check.log. Works offline: it uses the python that has a CUDA torch ($PYTHON, else .venv, else
# python3) and installs headlab into it without dependencies when it is not importable yet.
set -uo pipefail
cd "$(dirname "$0")/.."
results=benchmarks/results
mkdir -p "$results"
log="$results/gpu_check.log"
: > "$log"
say() { echo "$*" | tee -a "$log"; }

python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  say "error: no CUDA GPU visible to $python (torch.cuda.is_available() is False): run this on a GPU machine"
  exit 2
fi
if ! "$python" -c "import headlab" 2>/dev/null; then
  say "installing headlab into $python (no dependencies, offline)"
  "$python" -m pip install -q --no-deps --no-build-isolation -e . >>"$log" 2>&1 || {
    say "error: could not install headlab into $python; install it (pip install -e .) and rerun"; exit 2; }
fi
"$python" - <<'EOF' | tee -a "$log"
import torch, triton
print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
EOF

status=0
unset TRITON_INTERPRET
say "== compiled Triton kernels against eager"
# The selected tests run the kernels compiled, in a subprocess without TRITON_INTERPRET.
if ! timeout 240 "$python" -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_score_edit.py \
    -k "gpu" 2>&1 | tee -a "$log"; then
  say "compiled-kernel tests FAILED (see $log)"
  status=1
fi

say "== benchmarks/attention_kernels.py (bf16, batch 1, causal, GQA)"
if ! timeout 300 "$python" benchmarks/attention_kernels.py --device cuda --repeats 5 \
    --out "$results/kernels_gpu.json" 2>&1 | tee -a "$log"; then
  say "benchmark FAILED or ran out of time (see $log)"
  status=1
fi
if [ -f "$results/kernels_gpu.json" ]; then
  "$python" - <<'EOF' > "$results/kernels_gpu.md"
import json, sys
sys.path.insert(0, "benchmarks")
from kernels import table
print(table(json.load(open("benchmarks/results/kernels_gpu.json"))))
EOF
  say "table: $results/kernels_gpu.md"
fi
exit $status
