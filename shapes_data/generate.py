"""The Chinese shapes data set: specs, rendering, captions and the TSV files.

Every image holds one axis-aligned, single-colour shape (圆形 / 正方形 / 三角形, and
星形 for the fine-tuning tutorial) on a plain background (白色 / 黑色 / 灰色).  Captions
are natural Chinese sentences that always name the colour and the shape and only ever
state true facts about background, size (大 / 小) and position (3×3 grid).

Files follow the EasyNLP latent-diffusion tutorial layout (tab separated, no header):

* ``T2I_train.tsv`` / ``T2I_val.tsv``: ``idx\\ttext\\timgbase64``
* ``T2I_test.tsv`` / ``T2I_heldout.tsv``: ``idx\\ttext``
* ``T2I_heldout_images.tsv``: ``idx\\ttext\\timgbase64`` (same rows as ``T2I_heldout.tsv``)
* ``<split>.truth.jsonl``: one JSON object per row with the exact ground truth.

Images are PNG in standard base64 (``easynlp_ldm.tables.encode_image_base64``); every file is
written whole through ``easynlp_ldm.files.atomic_open``.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Optional, Union

from PIL import Image, ImageDraw

from easynlp_ldm.files import atomic_open
from easynlp_ldm.tables import encode_image_base64

# ----------------------------------------------------------------------------- constants

COLOURS: dict[str, tuple[int, int, int]] = {
    "红色": (230, 30, 30),
    "绿色": (30, 180, 60),
    "蓝色": (30, 80, 230),
    "黄色": (240, 220, 30),
    "紫色": (150, 50, 200),
    "橙色": (250, 140, 20),
}
SHAPES: tuple[str, ...] = ("圆形", "正方形", "三角形")
STAR = "星形"
ALL_SHAPES: tuple[str, ...] = SHAPES + (STAR,)
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "白色": (255, 255, 255),
    "黑色": (0, 0, 0),
    "灰色": (128, 128, 128),
}
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("蓝色", "三角形"), ("黄色", "圆形"), ("紫色", "正方形")})

SIZES: tuple[str, ...] = ("大", "小")
# Bounding-box side as a fraction of the image side (64 px: 小 16-22.4 px, 大 32-38.4 px).  大 stays below
# 2 * (1/3 - MARGIN_FRAC - 0.01) so a large shape still fits with its centre inside a corner cell.
SIZE_RANGES: dict[str, tuple[float, float]] = {"小": (0.25, 0.35), "大": (0.50, 0.60)}
MARGIN_FRAC = 0.02  # minimum gap between shape and image border
JITTER_FRAC = 0.04  # centre jitter around the grid-cell centre

POSITIONS: tuple[str, ...] = ("左上", "上方", "右上", "左边", "中间", "右边", "左下", "下方", "右下")
POSITION_CELLS: dict[str, tuple[int, int]] = {name: (i % 3, i // 3) for i, name in enumerate(POSITIONS)}  # (col, row)

# Caption phrases.  No phrase is a substring of a phrase of another position, and no fixed
# template text contains 大/小 or any position phrase, so captions can be parsed back.
POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "左上": ("左上角",),
    "上方": ("上方", "顶部"),
    "右上": ("右上角",),
    "左边": ("左边", "左侧"),
    "中间": ("中间", "正中间", "中央"),
    "右边": ("右边", "右侧"),
    "左下": ("左下角",),
    "下方": ("下方", "底部"),
    "右下": ("右下角",),
}
SIZE_PHRASES: dict[str, tuple[str, ...]] = {"大": ("大的",), "小": ("小的",)}
SIZE_PHRASES_DOUBLED: dict[str, tuple[str, ...]] = {"大": ("大大的",), "小": ("小小的",)}

# {c} colour, {s} shape, {b} background, {z} size phrase, {zz} doubled size phrase, {p} position phrase.
# {cs} is "红色的圆形" or "红色圆形" (chosen at random).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "一个{c}的{s}",
    "{b}背景上有一个{c}的{s}",
    "{c}{s}，{b}背景",
    "画面{p}是一个{z}{c}{s}",
    "在{b}的背景上画着一个{zz}{c}{s}",
    "{p}有一个{c}的{s}",
    "一张图片：{c}的{s}，背景是{b}",
    "{b}底色上的一个{cs}",
    "一个{z}{c}{s}位于{b}背景的{p}",
    "{cs}在{b}背景的{p}",
    "一个{cs}，{b}的背景",
    "纯{b}背景，{p}有一个{z}{c}{s}",
    "{b}背景中的{cs}",
    "简单的几何图形：{cs}",
    "一个{z}{cs}，{b}背景，位于{p}",
)

SHAPE_SLUGS = {"圆形": "circle", "正方形": "square", "三角形": "triangle", STAR: "star"}

STAR_INNER_RATIO = 0.45  # inner / outer radius; fatter than a pentagram so it survives 64 px
_SS = 4  # supersampling factor for anti-aliasing

# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to render (and caption) one image.  Geometry is in pixels of an
    ``image_size`` × ``image_size`` image; ``extent`` is the side of the square box that
    contains the shape, centred on (``cx``, ``cy``)."""

    colour: str
    shape: str
    background: str
    size: str
    position: str
    cx: float
    cy: float
    extent: float
    image_size: int = 64

    def to_json(self) -> dict:
        return asdict(self)


def _cell_interval(k: int, image_size: int) -> tuple[float, float]:
    return k * image_size / 3.0, (k + 1) * image_size / 3.0


def _sample_centre(rng: random.Random, k: int, extent: float, image_size: int) -> float:
    lo_cell, hi_cell = _cell_interval(k, image_size)
    eps = 0.01 * image_size
    margin = MARGIN_FRAC * image_size
    lo = max(lo_cell + eps, extent / 2.0 + margin)
    hi = min(hi_cell - eps, image_size - extent / 2.0 - margin)
    if lo > hi:  # cannot happen with SIZE_RANGES; staying inside the image wins over staying in the cell
        lo = hi = min(max((lo_cell + hi_cell) / 2.0, extent / 2.0 + margin), image_size - extent / 2.0 - margin)
    nominal = (lo_cell + hi_cell) / 2.0
    jitter = JITTER_FRAC * image_size
    a, b = max(lo, nominal - jitter), min(hi, nominal + jitter)
    if a > b:  # nominal window outside the feasible range: use the feasible range itself
        a, b = lo, hi
    return rng.uniform(a, b)


def _allowed(pairs_allowed, colour: str, shape: str) -> bool:
    if pairs_allowed is None:
        return True
    if callable(pairs_allowed):
        return bool(pairs_allowed(colour, shape))
    return (colour, shape) in pairs_allowed


def sample_spec(
    rng: random.Random,
    *,
    shapes: Sequence[str] = SHAPES,
    pairs_allowed: Union[None, Callable[[str, str], bool], Iterable[tuple]] = None,
    image_size: int = 64,
) -> ShapeSpec:
    """Draw a random spec.  ``pairs_allowed`` is None (everything), a callable
    ``(colour, shape) -> bool`` or a collection of allowed ``(colour, shape)`` tuples.
    The colour×shape pair is uniform over the allowed pairs."""
    if pairs_allowed is not None and not callable(pairs_allowed):
        pairs_allowed = frozenset(tuple(p) for p in pairs_allowed)
    pairs = [(c, s) for c in COLOURS for s in shapes if _allowed(pairs_allowed, c, s)]
    if not pairs:
        raise ValueError("no allowed colour/shape pair")
    colour, shape = rng.choice(pairs)
    background = rng.choice(list(BACKGROUNDS))
    size = rng.choice(SIZES)
    position = rng.choice(POSITIONS)
    lo, hi = SIZE_RANGES[size]
    extent = round(rng.uniform(lo, hi) * image_size, 2)
    col, row = POSITION_CELLS[position]
    cx = round(_sample_centre(rng, col, extent, image_size), 2)
    cy = round(_sample_centre(rng, row, extent, image_size), 2)
    return ShapeSpec(colour, shape, background, size, position, cx, cy, extent, image_size)


# ----------------------------------------------------------------------------- render


def _star_points_unit() -> list[tuple[float, float]]:
    """Upward 5-pointed star polygon normalised to fill the unit box [0,1]²."""
    pts = []
    for k in range(10):
        ang = math.radians(-90.0 + 36.0 * k)
        r = 1.0 if k % 2 == 0 else STAR_INNER_RATIO
        pts.append((r * math.cos(ang), r * math.sin(ang)))
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [((x - x0) / (x1 - x0), (y - y0) / (y1 - y0)) for x, y in pts]


_STAR_UNIT = _star_points_unit()
STAR_ASPECT = (1.0 + math.cos(math.radians(36.0))) / (2.0 * math.sin(math.radians(72.0)))  # height / width


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: float, y0: float, x1: float, y1: float, fill) -> None:
    """Draw ``shape`` filling the box [x0, x1) × [y0, y1) (continuous pixel coordinates)."""
    if shape == "圆形":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=fill)
    elif shape == "正方形":
        draw.rectangle([round(x0), round(y0), round(x1) - 1, round(y1) - 1], fill=fill)
    elif shape == "三角形":
        draw.polygon([((x0 + x1) / 2.0, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == STAR:
        w, h = x1 - x0, y1 - y0
        draw.polygon([(x0 + u * w, y0 + v * h) for u, v in _STAR_UNIT], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(spec: ShapeSpec, image_size: int = 64) -> Image.Image:
    """Render ``spec`` as an RGB image (anti-aliased: drawn at 4× and box-downsampled).
    If ``image_size`` differs from ``spec.image_size`` the geometry is scaled."""
    scale = image_size / float(spec.image_size) * _SS
    big = Image.new("RGB", (image_size * _SS, image_size * _SS), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(big)
    cx, cy = spec.cx * scale, spec.cy * scale
    w = h = spec.extent * scale
    if spec.shape == STAR:  # the star is a bit wider than tall: centre its own box in the square box
        h = w * STAR_ASPECT
    draw_shape(draw, spec.shape, cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0, COLOURS[spec.colour])
    return big.resize((image_size, image_size), Image.Resampling.BOX)


# ----------------------------------------------------------------------------- captions


def caption(spec: ShapeSpec, rng: random.Random, *, template: Optional[int] = None) -> str:
    """A natural Chinese caption for ``spec``; ``template`` forces one of CAPTION_TEMPLATES."""
    idx = rng.randrange(len(CAPTION_TEMPLATES)) if template is None else template
    tpl = CAPTION_TEMPLATES[idx]
    c, s = spec.colour, spec.shape
    cs = f"{c}的{s}" if rng.random() < 0.5 else f"{c}{s}"
    return tpl.format(
        c=c,
        s=s,
        cs=cs,
        b=spec.background,
        z=rng.choice(SIZE_PHRASES[spec.size]),
        zz=rng.choice(SIZE_PHRASES_DOUBLED[spec.size]),
        p=rng.choice(POSITION_PHRASES[spec.position]),
    )


def parse_caption(text: str) -> dict:
    """Attributes a caption mentions: keys colour, shape, background, size, position
    (None when not mentioned).  Inverse of :func:`caption`, handy for prompts."""
    out: dict = {"colour": None, "shape": None, "background": None, "size": None, "position": None}
    for key, names in (("colour", COLOURS), ("background", BACKGROUNDS), ("shape", ALL_SHAPES), ("size", SIZES)):
        for name in names:
            if name in text:
                out[key] = name  # the last one named wins
    phrases = sorted(((ph, pos) for pos, phs in POSITION_PHRASES.items() for ph in phs), key=lambda t: -len(t[0]))
    rest = text
    for ph, pos in phrases:
        if ph in rest:
            out["position"] = pos
            rest = rest.replace(ph, "\0")
    return out


# ----------------------------------------------------------------------------- data set

_IMAGE_SPLITS = ("train", "val")


def _write_lines(path: str, lines: Iterable[str]) -> int:
    """Write ``lines`` (UTF-8, each ended by ``\\n`` on every platform) atomically; returns how many."""
    n = 0
    with atomic_open(path, "wb") as f:
        for line in lines:
            f.write(line.encode("utf-8"))
            f.write(b"\n")
            n += 1
    return n


def _split_rows(split: str, count: int, *, seed: int, image_size: int, shapes, pairs_allowed, prefix: str,
                key: str) -> list[tuple[str, str, ShapeSpec]]:
    rng = random.Random(f"easynlp-ldm-shapes:{seed}:{key}:{split}")
    rows = []
    for i in range(count):
        spec = sample_spec(rng, shapes=shapes, pairs_allowed=pairs_allowed, image_size=image_size)
        rows.append((f"{prefix}{split}_{i + 1:06d}", caption(spec, rng), spec))
    return rows


def _render_b64(spec: ShapeSpec) -> str:
    return encode_image_base64(render(spec, spec.image_size))


def _truth_line(idx: str, text: str, spec: ShapeSpec, heldout: bool) -> str:
    d = {"idx": idx, "text": text}
    d.update(spec.to_json())
    d["heldout"] = heldout
    return json.dumps(d, ensure_ascii=False)


def validate_options(num_train, num_val, num_test, num_heldout, image_size, only_shape) -> None:
    """Raise ValueError for an argument :func:`generate_dataset` cannot use."""
    for name, v in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test),
                    ("num_heldout", num_heldout)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    if only_shape is not None and only_shape not in ALL_SHAPES:
        raise ValueError(f"only_shape must be one of {', '.join(ALL_SHAPES)}, got {only_shape!r}")


def generate_dataset(
    output_dir: str,
    *,
    seed: int = 0,
    num_train: int = 20000,
    num_val: int = 1000,
    num_test: int = 1000,
    num_heldout: int = 500,
    image_size: int = 64,
    only_shape: Optional[str] = None,
) -> dict[str, int]:
    """Write the data set into ``output_dir``; returns {path: rows} in writing order.

    Train/val/test never contain HELDOUT_PAIRS; ``T2I_heldout*.tsv`` contain only them.
    With ``only_shape`` every row has that shape (``星形`` gives a star-only set with no
    held-out split).  Same arguments → byte-identical files (for a given Pillow/zlib).  Each
    file is written to a temporary file beside it and then renamed into place."""
    validate_options(num_train, num_val, num_test, num_heldout, image_size, only_shape)
    os.makedirs(output_dir, exist_ok=True)
    shapes = (only_shape,) if only_shape else SHAPES
    prefix = f"{SHAPE_SLUGS[only_shape]}_" if only_shape else ""
    key = only_shape or "all"
    heldout_pairs = frozenset(p for p in HELDOUT_PAIRS if p[1] in shapes)

    def not_heldout(c, s):
        return (c, s) not in heldout_pairs

    plan = [("train", num_train, not_heldout, False), ("val", num_val, not_heldout, False),
            ("test", num_test, not_heldout, False)]
    if heldout_pairs:
        plan.append(("heldout", num_heldout, heldout_pairs, True))

    written: dict[str, int] = {}
    for split, count, allowed, heldout in plan:
        rows = _split_rows(split, count, seed=seed, image_size=image_size, shapes=shapes, pairs_allowed=allowed,
                           prefix=prefix, key=key)
        tsv = os.path.join(output_dir, f"T2I_{split}.tsv")
        images = [_render_b64(spec) for _, _, spec in rows] if split in _IMAGE_SPLITS or heldout else []
        if split in _IMAGE_SPLITS:
            written[tsv] = _write_lines(tsv, (f"{i}\t{t}\t{b}" for (i, t, _), b in zip(rows, images)))
        else:
            written[tsv] = _write_lines(tsv, (f"{i}\t{t}" for i, t, _ in rows))
        if heldout:
            p = os.path.join(output_dir, "T2I_heldout_images.tsv")
            written[p] = _write_lines(p, (f"{i}\t{t}\t{b}" for (i, t, _), b in zip(rows, images)))
        truth = os.path.join(output_dir, f"T2I_{split}.truth.jsonl")
        written[truth] = _write_lines(truth, (_truth_line(i, t, s, heldout) for i, t, s in rows))
    return written
