#!/usr/bin/env bash
# The tests: set up (first time only), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_HOME="$PWD/.cache/hf" MPLCONFIGDIR="$PWD/.cache/matplotlib" \
       TRITON_CACHE_DIR="$PWD/.cache/triton" TORCHINDUCTOR_CACHE_DIR="$PWD/.cache/inductor"
mkdir -p .cache/tmp && export TMPDIR="$PWD/.cache/tmp"
set +e
.venv/bin/python -m pytest -ra "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
