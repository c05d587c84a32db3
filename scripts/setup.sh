#!/usr/bin/env bash
# Create .venv and install the kit with its pinned dependencies (CPU torch). Idempotent: a
# stamp of the pinned files skips the install when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
stamp=.venv/.difflora-installed
want=$(cat requirements/constraints.txt pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77"
# torch first, alone: a plain "torch" requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "$(grep '^torch==' requirements/constraints.txt)"
.venv/bin/python -m pip install -q -c requirements/constraints.txt -e ".[notebooks,test]"
echo "$want" > "$stamp"
