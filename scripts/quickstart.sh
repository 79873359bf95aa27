#!/usr/bin/env bash
# A newcomer's first command: set up .venv, build a small Chinese shapes data set, and say where everything is.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
OUT="${1:-$ROOT/quickstart_output}"
mkdir -p "$OUT"
echo "[quickstart] generating the Chinese shapes data set into $OUT/data"
python scripts/make_shapes_dataset.py --output_dir "$OUT/data" --num_train 2000 --num_val 200 --num_test 50 \
  --num_heldout 50 --seed 0
echo "[quickstart] a few training rows (idx, caption):"
head -n 5 "$OUT/data/T2I_train.tsv" | cut -f1,2
echo "[quickstart] done. Data set: $OUT/data (T2I_train.tsv, T2I_val.tsv, T2I_test.tsv + *.truth.jsonl)"
