#!/usr/bin/env bash
# Rebuild the embedded DiT model (modelzoo/pretrained/shapes-dit-zh, issue 33) from scratch with fixed seeds, using
# this toolkit's own `easynlp --mode=train`: data → a random Z-Image-layout folder (scripts/init_dit_model.py:
# the transformer over the VAE of shapes-ldm-zh, a small Qwen3 caption encoder, one token per caption character) →
# train the transformer and the caption encoder together (flow matching, batch 64, bf16) → evaluate → ship (bf16
# weights). The design and the settings are the ones docs/embedded_model_research.md's probes chose
# ("shapes-dit-zh: the DiT's design measurements"). Usage: bash scripts/train_dit_model.sh [WORK_DIR]
# Environment: DIT_EPOCHS (default 24; 313 steps each), LR (1e-3), WEIGHTING (logit_normal; none is uniform),
# TRAIN_TEXT_ENCODER (True; False freezes the random caption encoder), INIT_ARGS (extra arguments of
# init_dit_model.py, e.g. "--dim 192 --layers 6"), SHIP=0 to skip copying into the package, DATA_ARGS (extra arguments
# of make_shapes_dataset.py; a smoke run: "--num_train 256 --num_val 32 --num_test 32 --num_heldout 16").
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
WORK="${1:-$ROOT/dit_model_work}"
DIT_EPOCHS="${DIT_EPOCHS:-24}"
LR="${LR:-1e-3}"
WEIGHTING="${WEIGHTING:-logit_normal}"
TRAIN_TEXT_ENCODER="${TRAIN_TEXT_ENCODER:-True}"
mkdir -p "$WORK"
export EASYNLP_PROGRESS="${EASYNLP_PROGRESS:-0}"
SCHEMA="--input_schema=idx:str:1,text:str:1,imgbase64:str:1 --first_sequence=text --second_sequence=imgbase64"
start=$(date +%s)

# Rerunning the same command after an interruption continues the training run where it stopped (the data and the
# initial folder, once written, are kept; the run resumes from its last checkpoint).
echo "[dit] 1/4 data: 20k/1k/1k/500 images at 64x64"
if [ ! -s "$WORK/data/T2I_heldout.truth.jsonl" ]; then
  # shellcheck disable=SC2086  # DATA_ARGS is a list of arguments
  python scripts/make_shapes_dataset.py --output_dir "$WORK/data" --seed 0 ${DATA_ARGS:-}
fi

echo "[dit] 2/4 a randomly initialised Z-Image-layout folder (the VAE of shapes-ldm-zh)"
if [ ! -f "$WORK/init/model_index.json" ]; then
  rm -rf "$WORK/init.tmp"
  # shellcheck disable=SC2086  # INIT_ARGS is a list of arguments
  python scripts/init_dit_model.py --captions "$WORK/data/T2I_train.tsv" --output "$WORK/init.tmp" --seed 0 \
    ${INIT_ARGS:-}
  mv "$WORK/init.tmp" "$WORK/init"
fi

echo "[dit] 3/4 transformer and caption encoder (train_text_encoder=$TRAIN_TEXT_ENCODER), $DIT_EPOCHS epochs"
easynlp --mode=train --tables="$WORK/data/T2I_train.tsv,$WORK/data/T2I_val.tsv" $SCHEMA \
  --checkpoint_dir="$WORK/final" --micro_batch_size=64 --epoch_num="$DIT_EPOCHS" --learning_rate="$LR" \
  --warmup_proportion=0.01 --random_seed=0 --logging_steps=50 --save_checkpoint_steps=500 --use_amp \
  --user_defined_parameters="pretrain_model_name_or_path=$WORK/init train_target=transformer train_text_encoder=$TRAIN_TEXT_ENCODER weighting_scheme=$WEIGHTING caption_dropout=0.1 ema_decay=0.999"

echo "[dit] 4/4 evaluate (the folder's default steps and guidance) and ship"
for split in T2I_test T2I_heldout; do
  easynlp --mode=evaluate --tables="$WORK/data/$split.tsv" --input_schema=idx:str:1,text:str:1 \
    --checkpoint_dir="$WORK/final" --micro_batch_size=50 --outputs="$WORK/eval_$split.json"
done
if [ "${SHIP:-1}" = "1" ]; then
  python - "$WORK/final" "$ROOT/modelzoo/pretrained/shapes-dit-zh" <<'PY'
import shutil, sys, torch
from modelzoo import families
source, target = sys.argv[1:]
shutil.rmtree(target, ignore_errors=True)
families.save(families.load(source, torch.bfloat16), target)
print("shipped", target)
PY
fi
echo "[dit] done in $(( $(date +%s) - start )) s"
