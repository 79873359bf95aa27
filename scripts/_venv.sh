# Sourced by quickstart.sh and test.sh: create or reuse .venv and install what the project needs.
# torch goes first and pinned, so pip takes the CPU build from local disk and never pulls a CUDA one.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${EASYNLP_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
REQS="$ROOT/requirements-dev.txt"
STAMP="$VENV/.easynlp-installed"
WANT="$(cat "$ROOT/requirements.txt" "$REQS" "$ROOT/requirements-sdk.txt" "$ROOT/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing dependencies (first run only)"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==2.13.0"
  "$VENV/bin/python" -m pip install -q -r "$REQS"
  "$VENV/bin/python" -m pip install -q --no-deps -r "$ROOT/requirements-sdk.txt"
  "$VENV/bin/python" -m pip install -q --no-deps -e "$ROOT"
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
