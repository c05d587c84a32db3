#!/usr/bin/env bash
# Execute the course notebooks top to bottom and write them, with their outputs, as HTML pages:
#   bash scripts/render_notebooks.sh            # learner defaults (the full schedules) -> docs/notebooks/
#   bash scripts/render_notebooks.sh --fast     # the tests' short schedules (FAST = True)
#   bash scripts/render_notebooks.sh --fast 04  # one notebook; other arguments go to notebooks/runner.py
# The committed .ipynb files stay without outputs; the kernels run in a scratch folder (.cache/).
# Needs nbconvert (for the HTML).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! .venv/bin/python -c "import nbconvert" 2>/dev/null; then
  echo "render_notebooks.sh: nbconvert is not installed: .venv/bin/python -m pip install nbconvert" >&2
  exit 1
fi
export HF_HUB_OFFLINE=1 HF_HOME="$PWD/.cache/hf" MPLCONFIGDIR="$PWD/.cache/matplotlib" \
       TRITON_CACHE_DIR="$PWD/.cache/triton" TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor"
mkdir -p .cache/tmp .cache/notebooks-run && export TMPDIR="$PWD/.cache/tmp"
exec .venv/bin/python notebooks/runner.py --html docs/notebooks --cwd .cache/notebooks-run "$@"
