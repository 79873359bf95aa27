#!/usr/bin/env bash
# A layout ControlNet for the embedded model (issue 17, item 5): the conditioning image is a rough layout (a grey box
# on black where the shape goes); the goal is the shape in the box >= 90 % of the time (the model alone ignores
# position). data → easynlp --mode=train train_target=controlnet → bench/layout_controlnet.py (same seeds with and
# without the ControlNet) → optionally ship to modelzoo/pretrained/shapes-layout-controlnet.
# Usage: bash scripts/train_layout_controlnet.sh [WORK_DIR]
# Environment: NUM_TRAIN (8000), NUM_VAL (256), NUM_TEST (150), EPOCHS (5), BATCH (64), LR (5e-4), EMA (0.995),
# MODEL (shapes-ldm-zh), GRID (docs/layout_controlnet.png; empty: none), SHIP=1 to copy the ControlNet into
# modelzoo/pretrained/shapes-layout-controlnet. Sized for ~30 minutes on 2 CPU cores (8000 images × 5 epochs at
# ~36 images/s in fp32). No --use_amp: on a CPU without native bf16 (this machine's) bf16 autocast makes the VAE
# encode ~45× and the step far slower; add AMP=1 on a GPU or a bf16 CPU.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
WORK="${1:-$ROOT/layout_controlnet_work}"
NUM_TRAIN="${NUM_TRAIN:-8000}"
NUM_VAL="${NUM_VAL:-256}"
NUM_TEST="${NUM_TEST:-150}"
EPOCHS="${EPOCHS:-5}"
BATCH="${BATCH:-64}"
LR="${LR:-5e-4}"
EMA="${EMA:-0.995}"
MODEL="${MODEL:-shapes-ldm-zh}"
GRID="${GRID-docs/layout_controlnet.png}"
mkdir -p "$WORK"
export EASYNLP_PROGRESS="${EASYNLP_PROGRESS:-0}"
start=$(date +%s)

echo "[layout] 1/3 data: $NUM_TRAIN/$NUM_VAL training/validation images with layouts, $NUM_TEST test layouts"
python scripts/make_layout_dataset.py --output_dir "$WORK/data" --seed 0 --num_train "$NUM_TRAIN" \
  --num_val "$NUM_VAL" --num_test "$NUM_TEST"

echo "[layout] 2/3 train the ControlNet (UNet, text encoder and VAE frozen; no flips: captions name left/right)"
easynlp --mode=train --tables="$WORK/data/T2I_train.tsv,$WORK/data/T2I_val.tsv" \
  --input_schema=idx:str:1,text:str:1,imgbase64:str:1,control:str:1 --first_sequence=text \
  --second_sequence=imgbase64 --checkpoint_dir="$WORK/controlnet" --micro_batch_size="$BATCH" \
  --epoch_num="$EPOCHS" --learning_rate="$LR" --warmup_proportion=0.03 --random_seed=0 --logging_steps=25 \
  --save_checkpoint_steps=125 ${AMP:+--use_amp} \
  --user_defined_parameters="pretrain_model_name_or_path=$MODEL train_target=controlnet random_flip=False snr_gamma=5 ema_decay=$EMA sample_images=0 overwrite_checkpoint_dir=True"

echo "[layout] 3/3 evaluate: in box / colour / shape, without and with the ControlNet (same seeds)"
GRID_ARGS=()
if [ -n "$GRID" ]; then GRID_ARGS=(--grid "$GRID"); fi
python bench/layout_controlnet.py --table "$WORK/data/layout_test.tsv" --model "$MODEL" \
  --controlnet "$WORK/controlnet" --rows "$NUM_TEST" --work_dir "$WORK/bench" --json "$WORK/layout_scores.json" \
  "${GRID_ARGS[@]}" | tee "$WORK/layout_scores.md"

if [ "${SHIP:-0}" = "1" ]; then
  DEST="$ROOT/modelzoo/pretrained/shapes-layout-controlnet"
  rm -rf "$DEST" && mkdir -p "$DEST"
  cp "$WORK/controlnet/config.json" "$WORK/controlnet/diffusion_pytorch_model.safetensors" "$DEST/"
  echo "[layout] shipped $DEST"
fi
echo "[layout] done in $(( $(date +%s) - start )) s"
