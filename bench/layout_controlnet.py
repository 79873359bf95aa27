"""Does a layout ControlNet put the shape in the box?  (issue 17, item 5)

    python bench/layout_controlnet.py --table DATA/layout_test.tsv [--model shapes-ldm-zh] \
        [--controlnet FOLDER[:scale] ...] [--rows 150] [--steps 20] [--grid docs/layout_controlnet.png]
    python bench/layout_controlnet.py --make_random_controlnet OUT [--model shapes-ldm-zh]   # a test fixture

The table is ``scripts/make_layout_dataset.py``'s ``layout_test.tsv`` (idx, text, control) with its
``layout_test.truth.jsonl`` (box, colour, shape). Each contender — the model without a ControlNet (the chance
baseline: captions may name a position, the model ignores it) and the model with each ``--controlnet`` — generates one
image per row through ``python -m easynlp_ldm.cli --mode=predict`` with the same ``--random_seed`` and the same row
order, so row L gets the same seed (hence the same initial noise) in every contender. Each image is judged by
``shapes_data.judge.judge_details`` (pixels only) and scored:

* **in box**: the judged shape's bounding-box centre ((x0+x1)/2, (y0+y1)/2 with exclusive pixel ends, i.e. continuous
  pixel coordinates) lies inside the layout's grey rectangle (x0 ≤ cx ≤ x1 and y0 ≤ cy ≤ y1 on its pixel edges); an
  image where the judge finds no shape counts as not in the box;
* **colour** / **shape**: the judged colour / shape equals the caption's;
* **all**: in box, colour and shape all right.

Prints each predict command line, then one Markdown table row per contender. ``--grid`` writes a PNG: the first
``--grid_rows`` layouts (top row), then one row of images per contender.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from modelzoo.families import sd  # noqa: E402
from shapes_data.layouts import in_box  # noqa: E402


def read_rows(table: str, truth_path: str, limit: int) -> list[tuple[list[str], dict]]:
    with open(table, encoding="utf-8") as f:
        cells = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    truth = {}
    with open(truth_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                truth[d["idx"]] = d
    cells = cells[:limit] if limit > 0 else cells
    missing = [c[0] for c in cells if c[0] not in truth]
    if missing:
        raise SystemExit(f"{truth_path}: no truth for {missing[:3]}")
    return [(c, truth[c[0]]) for c in cells]


def score(results: list[tuple[dict, dict]]) -> dict:
    """results: [(judge_details dict, truth dict with box/colour/shape)] → counts and fractions."""
    n = len(results)
    counts = {"in_box": 0, "colour": 0, "shape": 0, "all": 0, "found": 0}
    for judged, truth in results:
        ok_box = in_box(judged.get("bbox"), truth["box"])
        ok_colour = judged.get("colour") == truth["colour"]
        ok_shape = judged.get("shape") == truth["shape"]
        counts["in_box"] += ok_box
        counts["colour"] += ok_colour
        counts["shape"] += ok_shape
        counts["all"] += ok_box and ok_colour and ok_shape
        counts["found"] += judged.get("bbox") is not None
    return {"n": n, **counts, **{f"{k}_acc": (v / n if n else 0.0) for k, v in counts.items()}}


def predict(model: str, rows, controlnet: str | None, work: str, name: str, args) -> tuple[list, list[str]]:
    """Run predict on ``rows`` (with the control column only for a ControlNet); returns (images, command)."""
    from easynlp_ldm.tables import decode_image_base64

    table = os.path.join(work, f"{name}.in.tsv")
    with open(table, "w", encoding="utf-8") as f:
        for cells, _ in rows:
            f.write("\t".join(cells[:3] if controlnet else cells[:2]) + "\n")
    out = os.path.join(work, f"{name}.out.tsv")
    if os.path.exists(out):
        os.remove(out)
    udp = ["n_samples=1", f"ddim_steps={args.steps}", f"scale={args.guidance}"]
    if controlnet:
        udp.append(f"controlnet={controlnet}")
    if args.extra:
        udp.append(args.extra)
    schema = "idx:str:1,text:str:1,control:str:1" if controlnet else "idx:str:1,text:str:1"
    cmd = [sys.executable, "-m", "easynlp_ldm.cli", "--mode=predict", f"--tables={table}",
           f"--input_schema={schema}", "--first_sequence=text", f"--outputs={out}",
           "--output_schema=idx,gen_imgbase64", f"--checkpoint_dir={model}",
           f"--micro_batch_size={args.micro_batch_size}", f"--random_seed={args.random_seed}",
           f"--user_defined_parameters={' '.join(udp)}"]
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ, EASYNLP_PROGRESS="0")
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    images = {}
    with open(out, encoding="utf-8") as f:
        for line in f:
            idx, b64 = line.rstrip("\n").split("\t")[:2]
            images.setdefault(idx, decode_image_base64(b64).convert("RGB"))
    return [images[cells[0]] for cells, _ in rows], cmd


def make_grid(path: str, rows, contenders: list[tuple[str, list]], k: int, zoom: int = 2) -> None:
    from PIL import Image, ImageDraw

    from easynlp_ldm.tables import decode_image_base64

    k = min(k, len(rows))
    side, gap, label_w = 64 * zoom, 4, 0
    lines = [("layout", [decode_image_base64(cells[2]).convert("RGB") for cells, _ in rows[:k]])]
    lines += [(name, imgs[:k]) for name, imgs in contenders]
    grid = Image.new("RGB", (label_w + k * (side + gap) + gap, len(lines) * (side + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (_, imgs) in enumerate(lines):
        for c, im in enumerate(imgs):
            x, y = label_w + gap + c * (side + gap), gap + r * (side + gap)
            grid.paste(im.resize((side, side), Image.Resampling.NEAREST), (x, y))
            if r > 0:  # outline the layout box on generated images
                x0, y0, x1, y1 = rows[c][1]["box"]
                draw.rectangle([x + x0 * zoom, y + y0 * zoom, x + x1 * zoom - 1, y + y1 * zoom - 1],
                               outline=(255, 0, 255))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path, optimize=True)
    print(f"grid: {path} (top row: layouts; then " + ", ".join(n for n, _ in lines[1:])
          + "; magenta = the layout box)")


def make_random_controlnet(model: str, out: str, seed: int = 2) -> None:
    """A ControlNet initialised from the model's UNet as training does, its zero convolutions randomised (so it
    changes the images, without knowing anything about layouts): for testing this script end to end."""
    import torch
    from diffusers import ControlNetModel

    from appzoo.latent_diffusion.loading import resolve_model_path
    from appzoo.latent_diffusion.train_tasks import controlnet_conditioning_channels

    ldm = sd.load(resolve_model_path(model), dtype=torch.float32)
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(ldm.unet, conditioning_embedding_out_channels=controlnet_conditioning_channels(
        ldm.vae_scale_factor))
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "zero_conv" in name or "controlnet_mid_block" in name or "conv_out" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    net.save_pretrained(out)
    print(f"random ControlNet (vae factor {ldm.vae_scale_factor}, conditioning embedding "
          f"{tuple(net.config.conditioning_embedding_out_channels)}): {out}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table", help="layout_test.tsv from scripts/make_layout_dataset.py")
    p.add_argument("--truth", default="", help="default: the table's .truth.jsonl sidecar")
    p.add_argument("--model", default="shapes-ldm-zh")
    p.add_argument("--controlnet", action="append", default=[], help="FOLDER[:scale]; repeat for several")
    p.add_argument("--no_baseline", action="store_true", help="skip the model without a ControlNet")
    p.add_argument("--rows", type=int, default=150)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--random_seed", type=int, default=0)
    p.add_argument("--micro_batch_size", type=int, default=50)
    p.add_argument("--extra", default="", help="more user_defined_parameters for predict, e.g. sampler=ddim")
    p.add_argument("--work_dir", default="", help="predict inputs/outputs (default: a temporary folder)")
    p.add_argument("--grid", default="", help="write a PNG grid here (e.g. docs/layout_controlnet.png)")
    p.add_argument("--grid_rows", type=int, default=8)
    p.add_argument("--json", default="", help="also write the scores as JSON here")
    p.add_argument("--make_random_controlnet", default="", metavar="OUT")
    args = p.parse_args(argv)
    if args.make_random_controlnet:
        make_random_controlnet(args.model, args.make_random_controlnet)
        return 0
    if not args.table:
        p.error("--table is required")
    from shapes_data.generate import SHAPES
    from shapes_data.judge import judge_details

    truth_path = args.truth or os.path.splitext(args.table)[0] + ".truth.jsonl"
    rows = read_rows(args.table, truth_path, args.rows)
    work = args.work_dir or tempfile.mkdtemp(prefix="layout-bench-")
    os.makedirs(work, exist_ok=True)
    contenders = ([] if args.no_baseline else [("no ControlNet", None)]) + [
        (f"ControlNet {c}", c) for c in args.controlnet]
    table_lines, scores, images_by = [], {}, []
    for k, (name, cn) in enumerate(contenders):
        images, cmd = predict(args.model, rows, cn, work, f"c{k}", args)
        judged = [judge_details(im, shapes=SHAPES) for im in images]
        s = score([(j, t) for j, (_, t) in zip(judged, rows)])
        s["command"] = " ".join(shlex.quote(c) for c in cmd)
        scores[name] = s
        images_by.append((name, images))
        table_lines.append(f"| {name} | {s['n']} | **{100 * s['in_box_acc']:.1f} %** | "
                           f"{100 * s['colour_acc']:.1f} % | {100 * s['shape_acc']:.1f} % | "
                           f"{100 * s['all_acc']:.1f} % | {100 * s['found_acc']:.1f} % |")
    print(f"\nmodel {args.model}, {len(rows)} rows of {args.table}, {args.steps} steps, guidance {args.guidance}, "
          f"random_seed {args.random_seed} (same seeds for every contender)")
    print("in box = the judged shape's bbox centre inside the layout's grey rectangle\n")
    print("| contender | images | in box | colour | shape | all three | shape found |")
    print("|---|---|---|---|---|---|---|")
    for line in table_lines:
        print(line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(scores, f, ensure_ascii=False, indent=1)
    if args.grid:
        make_grid(args.grid, rows, images_by, args.grid_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
