#!/usr/bin/env bash
# A newcomer's first command: set up .venv, then generate images from a handful of Chinese prompts with the embedded
# default model, and say where the PNGs and the output TSV are.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$ROOT"
OUT="${1:-$ROOT/quickstart_output}"
mkdir -p "$OUT"
cat > "$OUT/prompts.tsv" <<'TSV'
1	白色背景上有一个红色的圆形
2	一个蓝色的正方形，背景是黑色
3	灰色背景上画着一个大大的黄色三角形
4	请画一个绿色的圆形
5	左上角有一个紫色的正方形
6	橙色的三角形在白色背景的中间
TSV
echo "[quickstart] generating 2 images for each of 6 prompts with the embedded model (CPU)"
EASYNLP_PROGRESS=0 easynlp --mode=predict --tables="$OUT/prompts.tsv" --input_schema=idx:str:1,text:str:1 \
  --first_sequence=text --outputs="$OUT/output.tsv" --output_schema=idx,text,seed,gen_imgbase64 \
  --micro_batch_size=6 --random_seed=42 --app_name=latent_diffusion --user_defined_parameters="
n_samples=2
write_image=True
image_prefix=$OUT/images/
"
echo "[quickstart] done."
echo "  images (PNG, one folder per prompt with prompt.txt): $OUT/images/"
echo "  output TSV (idx, text, seed, base64 PNG):            $OUT/output.tsv"
echo "  super-resolution ×4: add do_sr=True to --user_defined_parameters"
# The DiT model shipped beside it (shapes-dit-zh: a Z-Image-layout transformer trained here) also follows position;
# the default UNet model does not.
cat > "$OUT/position_prompts.tsv" <<'TSV'
1	左上角有一个红色的圆形
2	右下角有一个蓝色的正方形
3	黑色背景的顶部有一个黄色的三角形
4	左侧是一个小小的绿色圆形
TSV
for model in shapes-ldm-zh shapes-dit-zh; do
  echo "[quickstart] the same 4 prompts with positions, 2 images each, with $model (CPU)"
  EASYNLP_PROGRESS=0 easynlp --mode=predict --tables="$OUT/position_prompts.tsv" --input_schema=idx:str:1,text:str:1 \
    --first_sequence=text --outputs="$OUT/position_$model.tsv" --output_schema=idx,text,seed,gen_imgbase64 \
    --micro_batch_size=4 --random_seed=42 --checkpoint_dir="$model" --user_defined_parameters="
n_samples=2
write_image=True
image_prefix=$OUT/position_$model/
"
done
echo "  position, side by side: $OUT/position_shapes-ldm-zh/ (the UNet: places shapes anywhere) and"
echo "                          $OUT/position_shapes-dit-zh/ (the DiT: in the named place)"
# The layout ControlNet shipped beside the model: a grey box on black says where the shape goes.
python - "$OUT/layout_prompts.tsv" <<'PY'
import sys
from easynlp_ldm.tables import encode_image_base64
from shapes_data.layouts import render_layout
rows = [("1", "一个紫色的正方形", (4, 4, 26, 26)), ("2", "红色的圆形", (38, 36, 60, 58)),
        ("3", "蓝色的三角形", (36, 4, 60, 28))]
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for idx, text, box in rows:
        f.write(f"{idx}\t{text}\t{encode_image_base64(render_layout(box))}\n")
PY
echo "  position by layout (the shipped layout ControlNet; $OUT/layout_prompts.tsv holds 3 prompts + layout boxes):"
echo "    easynlp --mode=predict --tables=$OUT/layout_prompts.tsv --input_schema=idx:str:1,text:str:1,control:str:1 \\"
echo "      --first_sequence=text --outputs=$OUT/layout.tsv --output_schema=idx,text,gen_imgbase64 \\"
echo "      --user_defined_parameters='controlnet=shapes-layout-controlnet write_image=True image_prefix=$OUT/layout/'"
