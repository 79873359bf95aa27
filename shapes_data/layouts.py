"""The layout data set, shapes data for a ControlNet (issue 17, item 5): each image of the shapes data set paired
with a rough layout — a mid-grey filled rectangle on black where the shape goes.  Its command line is
:func:`shapes_data.cli.layout_main`:

    python scripts/make_layout_dataset.py --output_dir DIR [--seed 0] [--num_train 8000 --num_val 256 --num_test 150]

Writes (tab separated, no header, images as PNG base64 like the shapes data set):

* ``T2I_train.tsv`` / ``T2I_val.tsv``: ``idx  text  imgbase64  control`` — train with
  ``--input_schema=idx:str:1,text:str:1,imgbase64:str:1,control:str:1``;
* ``layout_test.tsv``: ``idx  text  control`` — predict with ``--input_schema=idx:str:1,text:str:1,control:str:1``;
* ``layout_test.truth.jsonl`` (and ``T2I_train/val.truth.jsonl``): idx, text, ``box`` [x0, y0, x1, y1] (the grey
  rectangle, pixel edges: it covers pixels x0 ≤ x < x1, y0 ≤ y < y1), colour, shape and the full shape spec.

Specs, captions and images come from :mod:`shapes_data.generate` (``sample_spec``, ``caption``, ``render``), drawn with
their own seeded RNG per split (``easynlp-ldm-layout:{seed}:{split}``), without the held-out colour/shape pairs; the
caption always agrees with the layout (same spec). The layout box is the shape's own box, enlarged by 0–20 % per
side pair and shifted by at most half of that enlargement, so it is "rough" yet always contains the whole shape.
"""

from __future__ import annotations

import json
import math
import os
import random

from PIL import Image, ImageDraw

from easynlp_ldm.files import atomic_open
from easynlp_ldm.tables import encode_image_base64
from shapes_data.generate import HELDOUT_PAIRS, SHAPES, STAR, STAR_ASPECT, ShapeSpec, caption, render, sample_spec

LAYOUT_GREY = 128
MAX_ENLARGE = 0.20  # the layout box's side is the shape's side × (1 + U(0, MAX_ENLARGE))


def shape_box(spec: ShapeSpec) -> tuple[float, float, float, float]:
    """The shape's exact box (x0, y0, x1, y1) in continuous pixel coordinates (as ``render`` draws it)."""
    w = h = spec.extent
    if spec.shape == STAR:
        h = w * STAR_ASPECT
    return spec.cx - w / 2.0, spec.cy - h / 2.0, spec.cx + w / 2.0, spec.cy + h / 2.0


def layout_box(spec: ShapeSpec, rng: random.Random | None = None) -> tuple[int, int, int, int]:
    """Integer pixel box (x0, y0, x1, y1), end exclusive, covering the shape's box: enlarged by U(0, MAX_ENLARGE)
    of its side on each axis and shifted by at most half the enlargement (so the shape stays inside), then rounded
    outwards and clipped to the image. With ``rng=None`` the exact box rounded outwards."""
    x0, y0, x1, y1 = shape_box(spec)
    if rng is not None:
        out = []
        for a, b in ((x0, x1), (y0, y1)):
            grow = (b - a) * rng.uniform(0.0, MAX_ENLARGE)
            shift = rng.uniform(-0.5, 0.5) * grow
            out.append((a - grow / 2.0 + shift, b + grow / 2.0 + shift))
        (x0, x1), (y0, y1) = out
    n = spec.image_size
    return (max(0, math.floor(x0)), max(0, math.floor(y0)), min(n, math.ceil(x1)), min(n, math.ceil(y1)))


def render_layout(box: tuple[int, int, int, int], image_size: int = 64) -> Image.Image:
    """Black RGB image with the box's pixels mid-grey."""
    im = Image.new("RGB", (image_size, image_size), (0, 0, 0))
    x0, y0, x1, y1 = box
    if x1 > x0 and y1 > y0:
        ImageDraw.Draw(im).rectangle([x0, y0, x1 - 1, y1 - 1], fill=(LAYOUT_GREY,) * 3)
    return im


def bbox_centre(bbox) -> tuple[float, float]:
    """Centre of a judged bbox (x0, y0, x1, y1; exclusive ends, as ``judge_details`` returns) in continuous pixel
    coordinates (pixel i spans [i, i+1))."""
    x0, y0, x1, y1 = bbox
    return (x0 + x1) / 2.0, (y0 + y1) / 2.0


def in_box(bbox, box) -> bool:
    """True when the judged bbox's centre lies inside the layout box (pixel edges x0 ≤ cx ≤ x1, y0 ≤ cy ≤ y1);
    False when nothing was found (bbox None)."""
    if bbox is None:
        return False
    cx, cy = bbox_centre(bbox)
    return box[0] <= cx <= box[2] and box[1] <= cy <= box[3]


def layout_rows(split: str, count: int, *, seed: int = 0, image_size: int = 64, shapes=SHAPES):
    """[(idx, text, spec, box)] for one split, deterministic in (seed, split)."""
    rng = random.Random(f"easynlp-ldm-layout:{seed}:{split}")

    def allowed(c, s):
        return (c, s) not in HELDOUT_PAIRS

    rows = []
    for i in range(count):
        spec = sample_spec(rng, shapes=shapes, pairs_allowed=allowed, image_size=image_size)
        text = caption(spec, rng)
        rows.append((f"layout_{split}_{i + 1:06d}", text, spec, layout_box(spec, rng)))
    return rows


def _truth(idx, text, spec, box) -> str:
    d = {"idx": idx, "text": text, "box": list(box), "colour": spec.colour, "shape": spec.shape,
         "spec": spec.to_json()}
    return json.dumps(d, ensure_ascii=False)


def _write(path: str, lines) -> int:
    n = 0
    with atomic_open(path, "wb") as f:
        for line in lines:
            f.write(line.encode("utf-8") + b"\n")
            n += 1
    return n


def make_layout_dataset(output_dir: str, *, seed: int = 0, num_train: int = 8000, num_val: int = 256,
                        num_test: int = 150, image_size: int = 64) -> dict[str, int]:
    """Write the files listed in the module docstring; returns {path: rows}."""
    os.makedirs(output_dir, exist_ok=True)
    written = {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        rows = layout_rows(split, count, seed=seed, image_size=image_size)
        controls = [encode_image_base64(render_layout(box, image_size)) for *_, box in rows]
        if split == "test":
            tsv, truth = "layout_test.tsv", "layout_test.truth.jsonl"
            lines = (f"{i}\t{t}\t{c}" for (i, t, _, _), c in zip(rows, controls))
        else:
            tsv, truth = f"T2I_{split}.tsv", f"T2I_{split}.truth.jsonl"
            lines = (f"{i}\t{t}\t{encode_image_base64(render(s, image_size))}\t{c}"
                     for (i, t, s, _), c in zip(rows, controls))
        written[os.path.join(output_dir, tsv)] = _write(os.path.join(output_dir, tsv), lines)
        written[os.path.join(output_dir, truth)] = _write(os.path.join(output_dir, truth),
                                                          (_truth(*r) for r in rows))
    return written

