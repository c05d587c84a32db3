#!/usr/bin/env bash
# The tests: set up (first time only), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The real-browser test's tools (chromium via apt, playwright + jupyterlab via pip). Root (CI)
# can install them: a failure there fails the run, and the browser test may not skip. Without
# root and without chromium, the browser test skips (setup_browser.sh says how to install it).
if bash scripts/setup_browser.sh; then
  export DIFFLORA_REQUIRE_BROWSER=1
elif [ "$(id -u)" -eq 0 ]; then
  echo "scripts/setup_browser.sh failed" >&2
  exit 1
else
  echo "warning: the browser test will skip (see the message above)" >&2
fi
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
