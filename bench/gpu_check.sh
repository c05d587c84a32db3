#!/usr/bin/env bash
# What only a GPU shows, in one device call: five checks, most telling first, all within 480 s
# including the install, each result written to $OUT as it is made, at most 8 files there.
#
#   bash bench/gpu_check.sh [--wheels DIR] [--only STEP,...] [--dry-run]
#
# Steps (bound in seconds; the bounds add up to at most LIMIT = 480, checked before anything runs):
#   install    30  the carried wheels into a folder of their own (pip --target; its errors in install.txt)
#   imports    30  the kit and every package import; bitsandbytes names its native CUDA library (imports.txt)
#   tests     100  the GPU tests: tests/test_*gpu*.py, test_devices.py, test_session_device.py (tests.txt)
#   doctor     70  `difflora doctor`: every CUDA path against its reference (doctor.txt)
#   notebooks 110  notebooks 02, 03, 08 with FAST and DEVICE='cuda', solutions in (notebooks.txt): plain
#                  Python (notebooks/runner.py --plain: the image has no Jupyter kernel), 60 s each at most
#   memory    130  SD 1.5 at 512, then SDXL at 1024: 3 steps of step 2, random weights, checkpointing on,
#                  without and with --offload-blocks 4: peak GPU memory and host memory against the plan
#                  (bench/gpu_memory.py, 75 s a run at most; memory.txt, and memory.json rewritten after
#                  each run: SD 1.5's pair comes first, SDXL's second run may not fit in the bound)
# $OUT/summary.txt gets the card and one line per step as it ends ("NAME: PASS|FAIL|SKIP ..."). A step
# that runs past its bound is stopped and counts as FAIL; what it wrote so far stays in its file.
# --only imports,notebooks: run only those steps (install always runs): a second, shorter try.
# --dry-run (or GPU_CHECK_DRY=1): no GPU wanted; every step's set-up runs instead of the step: the
#   install (when --wheels is given), the import folder, each module found, the GPU tests collected,
#   the doctor's command line, the notebooks prepared and compiled, the memory runs listed; the same
#   files in $OUT, the same budget checks (tests/test_gpu_check.py runs it in CI). Its steps may take
#   4x their bounds (CI's shared CPUs are slower than the device's; the bounds are the device's).
#   With --wheels it asks pip what it would install for the device's Python 3.12, installing nothing.
# Without $OUT the files go to bench/results/gpu_check/ (dry run: a temporary folder).
#
# The kit is imported from a folder this script builds ($WORK/kit): difflora_kit/ linked file by file,
# plus kernels/ as difflora_kit/kernels (what pyproject's package-dir does in an install), so no
# editable install is needed; PYTHONSAFEPATH keeps the repository root (and its bare kernels/) off
# sys.path. The wheels go to $WORK/site, ahead of the machine's own packages on PYTHONPATH.
#
# ---- The device call a later session makes (prepared 2026-12-03; never run: no GPU was lent) ----
# 1. Here, in the repository root, once (the wheels the H200 image lacks, for its Python 3.12; 49 MB:
#    bitsandbytes 43, diffusers 6.4, nbformat and its needs 0.8; with the ~9 MB tree under the 64 MiB
#    a call carries; bitsandbytes' wheel is tagged manylinux_2_24, hence that --platform):
#      echo /.whl/ >> .git/info/exclude
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#        diffusers==0.42.1 bitsandbytes==0.50.2 nbformat==5.11.1 fastjsonschema==2.22.3 jsonschema==4.26.0 \
#        jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 jupyter_core==5.9.1 \
#        traitlets==5.16.1 platformdirs==4.14.9
#    then, costing no device time: bash bench/gpu_check.sh --dry-run --wheels .whl   (pip says whether they
#    install on the device's Python 3.12, two versions of one package included; nothing is installed)
# 2. The device tool's `run`:
#      command:   bash bench/gpu_check.sh --wheels .whl
#      carry:     [".whl"]
#      timeout_s: 540      (480 s of steps, bookkeeping, a margin; leaves ~4 min of the 15 for a
#                           `--only STEP` retry after a start of 1-2 min)
#    The 8 files come back under files_at: summary.txt install.txt imports.txt tests.txt doctor.txt
#    notebooks.txt memory.txt memory.json. Then give_back unless retrying at once.
set -uo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."
REPO=$PWD
LIMIT=${GPU_CHECK_LIMIT:-480}  # the device call's budget (the variable: for tests/test_gpu_check.py)
MAX_FILES=8
STEPS=(install imports tests doctor notebooks memory)
declare -A BOUND=([install]=30 [imports]=30 [tests]=100 [doctor]=70 [notebooks]=110 [memory]=130)

DRY=${GPU_CHECK_DRY:-0}
WHEELS=""
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder of .whl files}"; shift ;;
    --only) ONLY="${2:?--only needs step names, e.g. notebooks,memory}"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (see the top of bench/gpu_check.sh)" >&2; exit 2 ;;
  esac
  shift
done
[ "$DRY" = 1 ] || DRY=0
case "$WHEELS" in /*|"") ;; *) WHEELS=$CALLER/$WHEELS ;; esac
SLACK=$([ "$DRY" = 1 ] && echo 4 || echo 1)  # a dry run's set-ups are light, but CI's CPUs are slow and shared
for s in ${ONLY//,/ }; do
  [ -n "${BOUND[$s]:-}" ] || { echo "gpu_check.sh: --only: no step $s (steps: ${STEPS[*]})" >&2; exit 2; }
done

PY=${PY:-$REPO/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if [ -z "${OUT:-}" ]; then
  if [ "$DRY" = 1 ]; then OUT=$WORK/out; else OUT=$REPO/bench/results/gpu_check; fi
fi
mkdir -p "$OUT"
cleanup() {
  case "$OUT/" in
    "$WORK"/*) rm -rf "$WORK/kit" ;;  # the import links; the rest stays beside the files
    *) rm -rf "$WORK" ;;  # links (never what they point to), installed wheels, notebook outputs
  esac
}
trap cleanup EXIT
SUMMARY=$OUT/summary.txt
START=$(date +%s)

say() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(( $(date +%s) - START )); }

# ---- the budget, before anything runs
total=0
for s in "${STEPS[@]}"; do total=$(( total + BOUND[$s] )); done
: > "$SUMMARY"
say "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) mode=$([ "$DRY" = 1 ] && echo dry || echo gpu) limit=${LIMIT}s files<=$MAX_FILES"
say "budget: step bounds add up to $total s (limit $LIMIT s)"
if [ "$total" -gt "$LIMIT" ]; then
  say "budget: FAIL: the bounds exceed the limit; lower them in BOUND"
  exit 2
fi

# ---- the card
if [ "$DRY" = 1 ]; then
  say "device: dry run, no GPU asked for ($(uname -m), $(nproc) CPUs)"
else
  say "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 | head -3)"
fi

# ---- where the kit and the wheels are imported from
SITE=$WORK/site
KIT=$WORK/kit
mkdir -p "$SITE" "$KIT/difflora_kit"
for f in "$REPO"/difflora_kit/*; do ln -s "$f" "$KIT/difflora_kit/"; done
ln -sfn "$REPO/kernels" "$KIT/difflora_kit/kernels"
export PYTHONPATH="$KIT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MPLCONFIGDIR=$WORK/matplotlib TRITON_CACHE_DIR=$WORK/triton HF_HOME=$WORK/hf
say "python: $PY; kit from $KIT (difflora_kit + kernels); wheels into $SITE"

# the GPU-only tests, and the check that a CPU test stays on the CPU on a GPU machine (conftest's pin)
GPU_TESTS=$(ls tests/test_*gpu*.py tests/test_devices.py tests/test_session_device.py 2>/dev/null | tr '\n' ' ')
NOTEBOOKS="02 03 08"

# ---- each step: run_NAME on a GPU, dry_NAME in a dry run; their output is the step's file
run_install() {
  if [ -z "$WHEELS" ]; then echo "SKIP: no --wheels: the packages of $PY are used as they are"; return 3; fi
  ls "$WHEELS"/*.whl || return 1
  "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl \
    && echo "installed into $SITE:" && ls "$SITE"
}
dry_install() {  # what pip would install for the device's Python 3.12 (x86-64), installing nothing
  if [ -z "$WHEELS" ]; then echo "SKIP: no --wheels given"; return 3; fi
  ls "$WHEELS"/*.whl || return 1
  "$PY" -m pip install --dry-run --no-index --no-deps --no-cache-dir --upgrade --target "$WORK/site-dry" \
    --python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$WHEELS"/*.whl
}
run_imports() { "$PY" bench/gpu_imports.py --kit-from "$KIT"; }
dry_imports() { "$PY" bench/gpu_imports.py --kit-from "$KIT" --dry-run; }
run_tests() { "$PY" -m pytest -q -rs -p no:cacheprovider $GPU_TESTS; }
dry_tests() { "$PY" -m pytest -q --collect-only -p no:cacheprovider $GPU_TESTS; }
run_doctor() { "$PY" -m difflora_kit.cli doctor; }
dry_doctor() { "$PY" -m difflora_kit.cli doctor --help; }
run_notebooks() {
  "$PY" notebooks/runner.py $NOTEBOOKS --fast --solutions --plain --set "DEVICE='cuda'" --cwd "$WORK/notebooks" \
    --timeout 60
}
dry_notebooks() { "$PY" notebooks/runner.py $NOTEBOOKS --fast --solutions --check --set "DEVICE='cuda'"; }
memory_args() { echo --models sd15,sdxl --checkpointing on --offload-blocks 0,4 --steps 3 --no-write; }
run_memory() { "$PY" bench/gpu_memory.py $(memory_args) --json "$OUT/memory.json" --timeout 75; }
dry_memory() { "$PY" bench/gpu_memory.py $(memory_args) --json "$OUT/memory.json" --dry-run; }
export PY SITE KIT WHEELS GPU_TESTS NOTEBOOKS OUT WORK
export -f run_install dry_install run_imports dry_imports run_tests dry_tests run_doctor dry_doctor \
  run_notebooks dry_notebooks memory_args run_memory dry_memory

FAILED=0
step() {  # step NAME: run_NAME (dry_NAME) with its bound, output to $OUT/NAME.txt, one line to the summary
  local name=$1 bound=${BOUND[$1]} t0 left rc verdict
  if [ -n "$ONLY" ] && [ "$name" != install ] && [[ ",$ONLY," != *",$name,"* ]]; then
    say "$name: SKIP (not in --only $ONLY)"
    return
  fi
  left=$(( LIMIT * SLACK - $(elapsed) ))
  bound=$(( bound * SLACK ))
  [ "$bound" -le "$left" ] || bound=$left
  if [ "$bound" -lt 5 ]; then
    say "$name: SKIP (the $LIMIT s are spent)"
    return
  fi
  t0=$(date +%s)
  timeout -k 5 "$bound" bash -c "$([ "$DRY" = 1 ] && echo dry || echo run)_$name" > "$OUT/$name.txt" 2>&1
  rc=$?
  case $rc in
    0) verdict=PASS ;;
    3) verdict=SKIP ;;
    124|137) verdict="FAIL (stopped at its bound)"; FAILED=$(( FAILED + 1 )) ;;
    *) verdict="FAIL (exit $rc)"; FAILED=$(( FAILED + 1 )) ;;
  esac
  say "$name: $verdict in $(( $(date +%s) - t0 )) s (bound $bound s) -> $name.txt"
  tail -n 15 "$OUT/$name.txt" | sed 's/^/    /'
}

for s in "${STEPS[@]}"; do step "$s"; done

files=$(find "$OUT" -type f | wc -l)
say "files: $files in $OUT (at most $MAX_FILES come back): $(cd "$OUT" && ls | tr '\n' ' ')"
[ "$files" -le "$MAX_FILES" ] || { say "files: FAIL: more than $MAX_FILES"; FAILED=$(( FAILED + 1 )); }
say "all: $FAILED failed, in $(elapsed) s (limit $LIMIT s)"
[ "$FAILED" -eq 0 ]
