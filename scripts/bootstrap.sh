#!/usr/bin/env bash
# Create .venv and install the pinned requirements (idempotent; quick when nothing changed).
# Usage: scripts/bootstrap.sh [requirements file]   (default: requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:-requirements.txt}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
hash="$(cat requirements*.txt | sha256sum | cut -c1-16)"
stamp=".venv/.installed-$(basename "$req")-$hash"
# The dev requirements include the runtime ones.
if [ ! -f "$stamp" ] && [ ! -f ".venv/.installed-requirements-dev.txt-$hash" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r "$req"
  touch "$stamp"
fi
