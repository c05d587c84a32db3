#!/usr/bin/env bash
# The main job: set up (first time only), then differential LoRA on the toy model -> out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 MPLCONFIGDIR="$PWD/.cache/matplotlib"
.venv/bin/difflora demo --out "${1:-out/demo}" --force
