#!/usr/bin/env bash
# Fine-tuning tutorial: teach the embedded model a new shape, 星形 (star), which it has never seen.
#   1. make 400 star images with captions (+ OLD_TRAIN=800 images of the old shapes, mixed in so it does not forget)
#   2. measure before: star accuracy and old-concept accuracy
#   3. fine-tune the VAE's decoder on the mix (train_target=vae_decoder): the frozen decoder draws small stars as
#      circles; the encoder stays frozen, so the latent space and the diffusion model stay valid
#   4. fine-tune the diffusion model (UNet + text encoder) on the mix, starting from step 3's model — or, with
#      UNET_MODE=lora, train a LoRA adapter of the UNet and the text encoder instead (LORA_RANK, default 32)
#   5. measure after
# Usage: bash scripts/finetune_demo.sh [WORK_DIR]     (DEC_EPOCHS, DEC_LR change step 3; EPOCHS, OLD_TRAIN, LR step 4)
#        UNET_MODE=lora bash scripts/finetune_demo.sh [WORK_DIR]   (LR defaults to 3e-3 there)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
WORK="${1:-$ROOT/finetune_demo_work}"
DEC_EPOCHS="${DEC_EPOCHS:-12}"
DEC_LR="${DEC_LR:-4e-4}"
EPOCHS="${EPOCHS:-30}"
OLD_TRAIN="${OLD_TRAIN:-800}"
UNET_MODE="${UNET_MODE:-full}"
LORA_RANK="${LORA_RANK:-32}"
if [ "$UNET_MODE" = lora ]; then LR="${LR:-3e-3}"; else LR="${LR:-3e-4}"; fi
export EASYNLP_PROGRESS="${EASYNLP_PROGRESS:-0}"
mkdir -p "$WORK"
SCHEMA="--input_schema=idx:str:1,text:str:1,imgbase64:str:1 --first_sequence=text --second_sequence=imgbase64"

echo "[tutorial] 1/5 data: 400 stars (+50 val, 200 test) and $OLD_TRAIN old shapes (+200 test)"
python scripts/make_shapes_dataset.py --output_dir "$WORK/stars" --only_shape 星形 --seed 11 \
  --num_train 400 --num_val 50 --num_test 200
python scripts/make_shapes_dataset.py --output_dir "$WORK/old" --seed 12 --num_train "$OLD_TRAIN" --num_val 50 \
  --num_test 200 --num_heldout 0
cat "$WORK/stars/T2I_train.tsv" "$WORK/old/T2I_train.tsv" > "$WORK/mix_train.tsv"
cat "$WORK/stars/T2I_val.tsv" "$WORK/old/T2I_val.tsv" > "$WORK/mix_val.tsv"

evaluate() {  # model, label[, user_defined_parameters]
  for split in stars old; do
    easynlp --mode=evaluate --tables="$WORK/$split/T2I_test.tsv" --input_schema=idx:str:1,text:str:1 \
      --checkpoint_dir="$1" --micro_batch_size=50 --outputs="$WORK/eval_$2_$split.json" \
      --user_defined_parameters="${3:-}" >/dev/null
  done
  python - "$WORK" "$2" <<'PY'
import json, sys
work, label = sys.argv[1], sys.argv[2]
stars = json.load(open(f"{work}/eval_{label}_stars.json"))["accuracy"]["all"]
old = json.load(open(f"{work}/eval_{label}_old.json"))["accuracy"]["all"]
print(f"[tutorial] {label}: star shape {stars['shape_acc']:.1%}, star both {stars['both_acc']:.1%}; "
      f"old shapes both {old['both_acc']:.1%}")
PY
}

echo "[tutorial] 2/5 before fine-tuning"
evaluate shapes-ldm-zh before

echo "[tutorial] 3/5 fine-tuning the VAE decoder on stars + old shapes"
start=$(date +%s)
easynlp --mode=train --tables="$WORK/mix_train.tsv,$WORK/mix_val.tsv" $SCHEMA --checkpoint_dir="$WORK/decoder" \
  --micro_batch_size=32 --epoch_num="$DEC_EPOCHS" --learning_rate="$DEC_LR" --warmup_proportion=0.05 \
  --random_seed=0 --logging_steps=50 --use_amp --user_defined_parameters="pretrain_model_name_or_path=shapes-ldm-zh
train_target=vae_decoder ema_decay=0.99 overwrite_checkpoint_dir=True"
decoder_done=$(date +%s)
echo "[tutorial] decoder fine-tuning took $(( decoder_done - start )) s"

if [ "$UNET_MODE" = lora ]; then
  echo "[tutorial] 4/5 training a LoRA (rank $LORA_RANK) of the UNet and the text encoder on stars + old shapes"
  easynlp --mode=train --tables="$WORK/mix_train.tsv,$WORK/mix_val.tsv" $SCHEMA --checkpoint_dir="$WORK/lora" \
    --micro_batch_size=32 --epoch_num="$EPOCHS" --learning_rate="$LR" --warmup_proportion=0.05 --random_seed=0 \
    --logging_steps=25 --use_amp --user_defined_parameters="pretrain_model_name_or_path=$WORK/decoder
train_target=lora lora_rank=$LORA_RANK lora_target_modules=attention,ff lora_text_encoder=True snr_gamma=5
ema_decay=0.995 overwrite_checkpoint_dir=True"
  MODEL="$WORK/decoder" UDP="lora=$WORK/lora"
else
  echo "[tutorial] 4/5 fine-tuning the diffusion model (UNet + text encoder) on stars + old shapes"
  easynlp --mode=train --tables="$WORK/mix_train.tsv,$WORK/mix_val.tsv" $SCHEMA --checkpoint_dir="$WORK/model" \
    --micro_batch_size=32 --epoch_num="$EPOCHS" --learning_rate="$LR" --warmup_proportion=0.05 --random_seed=0 \
    --logging_steps=25 --use_amp --user_defined_parameters="pretrain_model_name_or_path=$WORK/decoder
train_text_encoder=True snr_gamma=5 ema_decay=0.995 overwrite_checkpoint_dir=True"
  MODEL="$WORK/model" UDP=""
fi
end=$(date +%s)
echo "[tutorial] UNet fine-tuning ($UNET_MODE) took $(( end - decoder_done )) s; fine-tuning in all $(( end - start )) s"

echo "[tutorial] 5/5 after fine-tuning"
evaluate "$MODEL" after "$UDP"
echo "[tutorial] generate stars yourself:"
echo "  printf '1\t黑色背景上有一个黄色的星形\n' > stars.tsv && easynlp --mode=predict --tables=stars.tsv \\"
echo "    --outputs=stars_out.tsv --checkpoint_dir=$MODEL --user_defined_parameters='write_image=True image_prefix=stars/ $UDP'"
