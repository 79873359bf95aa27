#!/usr/bin/env bash
# usage: bash bench/output_digests.sh ROOT /abs/OUT
# Predict (the embedded default model; a tiny random model, plain and with a LoRA) and train (unet, lora, vae, rrdb,
# controlnet) on fixed seeds with the code of the checkout ROOT, in the folder OUT; prints a digest of every output
# TSV, image file and saved weight (tensors by name; images, files and TSV cells, by their decoded pixels, so the
# AIGC labels' metadata does not count). Run it on two checkouts and diff the lists: a reshaping that changes no
# behaviour prints the same list (issue 31: 27 lines, identical before and after).
set -euo pipefail
ROOT=$(cd "$1" && pwd); OUT=$2; rm -rf "$OUT" "$OUT.model" "$OUT.data"; mkdir -p "$OUT"
PY="${PYTHON:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python}"
export PYTHONPATH=$ROOT EASYNLP_PROGRESS=0 HF_HUB_OFFLINE=1 EASYNLP_LOG_LEVEL=WARNING
cd "$ROOT"
M=$OUT.model; D=$OUT.data
if [ ! -d $M ]; then $PY -c "from modelzoo.tiny import make_tiny_diffusers_model as m; m('$M', image_size=32)"; fi
if [ ! -d $D ]; then $PY -c "from shapes_data import generate_dataset as g; g('$D', seed=0, num_train=8, num_val=4, num_test=4, num_heldout=2, image_size=32)"; fi
printf '1\t红色的圆形\n2\t蓝色的正方形在左边\n3\t绿色的三角形\n' > $OUT/prompts.tsv
E="$PY -m easynlp_ldm.cli"
$E --mode=predict --tables=$OUT/prompts.tsv --input_schema=idx:str:1,text:str:1 --first_sequence=text --outputs=$OUT/pred.tsv --random_seed=7 --micro_batch_size=2 --user_defined_parameters="ddim_steps=5 n_samples=2 image_prefix=$OUT/img/ write_image=True optimize=none"
$E --mode=predict --tables=$OUT/prompts.tsv --input_schema=idx:str:1,text:str:1 --first_sequence=text --outputs=$OUT/pred_tiny.tsv --checkpoint_dir=$M --random_seed=7 --micro_batch_size=2 --user_defined_parameters="ddim_steps=4 write_image=False"
TR="--tables=$D/T2I_train.tsv,$D/T2I_val.tsv --input_schema=idx:str:1,text:str:1,imgbase64:str:1 --first_sequence=text --second_sequence=imgbase64 --random_seed=42 --logging_steps=1 --micro_batch_size=2 --epoch_num=1"
for t in unet lora vae rrdb; do
  $E --mode=train $TR --checkpoint_dir=$OUT/train_$t --user_defined_parameters="pretrain_model_name_or_path=$M train_target=$t use_ema=True sr_patch=16" >/dev/null 2>&1 || echo "train $t failed"
done
$E --mode=predict --tables=$OUT/prompts.tsv --input_schema=idx:str:1,text:str:1 --first_sequence=text --outputs=$OUT/pred_lora.tsv --checkpoint_dir=$M --random_seed=7 --user_defined_parameters="ddim_steps=4 write_image=False lora=$OUT/train_lora"
awk -F'\t' '{print $0"\t"$3}' $D/T2I_train.tsv > $OUT/ctrl.tsv
$E --mode=train --tables=$OUT/ctrl.tsv --input_schema=idx:str:1,text:str:1,imgbase64:str:1,control:str:1 --first_sequence=text --second_sequence=imgbase64 --random_seed=42 --micro_batch_size=2 --epoch_num=1 --checkpoint_dir=$OUT/train_controlnet --user_defined_parameters="pretrain_model_name_or_path=$M train_target=controlnet" >/dev/null 2>&1 || echo "train controlnet failed"
cd $OUT
$PY - <<'PY'
import base64, binascii, hashlib, io, os, torch, glob
from PIL import Image
from safetensors.torch import load_file
def h(t): return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:16]
# Images are digested by their decoded pixels (mode, size, bytes), not their file bytes: the AIGC label's metadata
# (a per-host producer and per-run ProduceID) differs between checkouts and hosts while the pixels must not.
def pixels(data):
    try: image = Image.open(io.BytesIO(data)); image.load()
    except Exception: return data
    return f"{image.mode}{image.size}".encode() + image.tobytes()
def cell(text):
    try: return pixels(base64.b64decode(text, validate=True)) if len(text) > 64 else text.encode()
    except (binascii.Error, ValueError): return text.encode()
def digest(f):
    data = open(f, 'rb').read()
    if f.endswith(".tsv"): data = b"\n".join(b"\t".join(cell(c) for c in line.split("\t")) for line in data.decode().split("\n"))
    elif f.endswith((".png", ".jpg")): data = pixels(data)
    return hashlib.sha256(data).hexdigest()[:16]
for f in sorted([g for g in glob.glob("*.tsv") if g not in ("ctrl.tsv",)]) + sorted(glob.glob("img*/**", recursive=True)):
    if os.path.isfile(f) and f != "prompts.tsv": print(f, digest(f))
for f in sorted(glob.glob("train_*/**/*", recursive=True)):
    if f.endswith(".bin") or f.endswith(".pth") or f.endswith(".safetensors"):
        if "training_state" in f or "optimizer" in f: continue
        sd = load_file(f) if f.endswith(".safetensors") else torch.load(f, weights_only=True)
        if isinstance(sd, dict) and all(torch.is_tensor(v) for v in sd.values()):
            print(f, hashlib.sha256("".join(k + h(v) for k, v in sorted(sd.items())).encode()).hexdigest()[:16], len(sd))
        else: print(f, "non-tensor", type(sd))
PY
