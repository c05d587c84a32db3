#!/usr/bin/env bash
# Everything only a GPU shows, in one call of at most 10 minutes, most important first:
#
#   bash bench/gpu_check.sh [--wheels DIR]
#
# 1. the GPU tests and `difflora doctor` (every CUDA path against its reference);
# 2. merge-kernel bandwidth against a plain copy of the same bytes (bench/merge_kernels.py);
# 3. step-2 peak memory of SDXL at 1024 and SD 1.5 at 512 (random weights, public configs) beside the
#    plan (bench/gpu_memory.py);
# 4. the batched sweep on CUDA (bench/sweep_speed.py);
# 5. notebooks 03 to 05 on the GPU with their times (notebooks/runner.py, DEVICE='cuda').
# --wheels DIR: install what is missing (diffusers, bitsandbytes, nbclient...) from the wheels in DIR
# (no network there). Each step has its own time bound, so a hung one cannot eat the rest. Results:
# bench/results/*_gpu.* and gpu_check_*.txt, naming the card (copied to $OUT when set).
# Never run yet: no GPU has been lent to this project's sessions.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=""
if [ "${1:-}" = "--wheels" ]; then WHEELS="${2:?--wheels needs a folder}"; fi
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
RES=bench/results
mkdir -p "$RES"
START=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: run with a bound, log to $RES/gpu_check_NAME.txt
  local name=$1 bound=$2; shift 2
  local t0=$(date +%s)
  timeout "$bound" "$@" > "$RES/gpu_check_$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - t0 )) s (bound $bound s)" | tee -a "$RES/gpu_check_summary.txt"
  tail -25 "$RES/gpu_check_$name.txt"
}
: > "$RES/gpu_check_summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv | tee "$RES/gpu_check_device.txt"
if [ -n "$WHEELS" ]; then
  for pkg in diffusers bitsandbytes peft safetensors nbclient ipykernel ipywidgets matplotlib; do
    "$PY" -c "import $pkg" 2>/dev/null || "$PY" -m pip install --no-index --find-links "$WHEELS" "$pkg" -q 2>&1 | tail -2
  done
  "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))" \
  | tee -a "$RES/gpu_check_device.txt"
export HF_HUB_OFFLINE=1 MPLCONFIGDIR="$PWD/.cache/matplotlib"
step tests 120 "$PY" -m pytest -q -rs tests/test_kernels_gpu.py tests/test_quant_gpu.py tests/test_devices.py tests/test_doctor.py
step doctor 90 "$PY" -m difflora_kit.cli doctor
step merge_kernels 60 "$PY" bench/merge_kernels.py --device cuda
step memory 120 "$PY" bench/gpu_memory.py --steps 3 --checkpointing on --name gpu_memory
step sweep 45 "$PY" bench/sweep_speed.py --device cuda --gates 0 --name sweep_speed_gpu
if "$PY" -c "import nbclient, ipykernel" 2>/dev/null; then
  step notebooks 120 "$PY" notebooks/runner.py 03 04 05 --set "DEVICE='cuda'"
else
  echo "notebooks: SKIP (no nbclient/ipykernel here: give them in --wheels)" | tee -a "$RES/gpu_check_summary.txt"
fi
echo "all: $(( $(date +%s) - START )) s" | tee -a "$RES/gpu_check_summary.txt"
if [ -n "${OUT:-}" ]; then cp "$RES"/*gpu* "$RES"/gpu_check_* "$OUT"/ 2>/dev/null || true; fi
