#!/usr/bin/env bash
# Set up (or reuse) .venv and run the whole suite: ruff first so style problems fail fast, then pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
echo "[test] ruff check"
ruff check .
echo "[test] pytest"
python -m pytest "$@"
