#!/usr/bin/env bash
# What the real-browser test (tests/test_browser.py) needs, on top of scripts/setup.sh:
#   - Python (into .venv): the "browser" extra of pyproject.toml (playwright, jupyterlab), pinned
#     by requirements/browser.txt. Playwright's Python package bundles its node driver; no browser
#     is downloaded (`playwright install` does not work on these machines).
#   - The browser: Debian's chromium (apt), at /usr/bin/chromium (or $DIFFLORA_CHROMIUM).
# Idempotent and cheap when done: a stamp of the pinned files skips pip, an existing chromium
# skips apt. Installing chromium needs root; without it this prints the command and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

stamp=.venv/.difflora-browser-installed
want=$(cat requirements/constraints.txt requirements/browser.txt pyproject.toml | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # The extra's requirements only: the project itself is already installed (editable) by setup.sh.
  mapfile -t reqs < <(.venv/bin/python -c 'import tomllib
for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["browser"]: print(r)')
  .venv/bin/python -m pip install -q -c requirements/constraints.txt -c requirements/browser.txt "${reqs[@]}"
  echo "$want" > "$stamp"
fi

chromium=${DIFFLORA_CHROMIUM:-/usr/bin/chromium}
if [ ! -x "$chromium" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup_browser.sh: $chromium is missing and installing it needs root. Run:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium fonts-dejavu-core" >&2
    echo "(or set DIFFLORA_CHROMIUM to a Chromium/Chrome binary)" >&2
    exit 1
  fi
  echo "setup_browser.sh: installing Debian's chromium (apt)..." >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  [ -x "$chromium" ] || { echo "setup_browser.sh: apt installed chromium but $chromium is not there" >&2; exit 1; }
  "$chromium" --version >&2 2>/dev/null || true
fi
