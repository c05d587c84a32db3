#!/usr/bin/env bash
# Everything that needs a GPU, in one call (for the device tool: `bash bench/gpu_check.sh`; never run yet: untimed).
# Writes bench/results/*_gpu.md/json (copied to $OUT when set) and the GPU tests' log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-bench/results}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu_check_device.txt"
"$PY" -m pytest -q tests/test_kernels_gpu.py tests/test_quant_gpu.py 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
"$PY" bench/merge_kernels.py --device cuda 2>&1 | tail -30
"$PY" bench/gpu_memory.py --compare-bnb --steps 4 --name gpu_memory 2>&1 | tail -12
"$PY" bench/sweep_speed.py --device cuda --gates 0 --name sweep_speed_gpu 2>&1 | tail -8
cp bench/results/*.md bench/results/*.json "$OUT"/ 2>/dev/null || true
