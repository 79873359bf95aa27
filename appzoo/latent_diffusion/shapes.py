"""Chinese "shapes" data set for text-to-image experiments, plus a pixel judge.

Every image holds one axis-aligned, single-colour shape (圆形 / 正方形 / 三角形, and
星形 for the fine-tuning tutorial) on a plain background (白色 / 黑色 / 灰色).  Captions
are natural Chinese sentences that always name the colour and the shape and only ever
state true facts about background, size (大 / 小) and position (3×3 grid).

Files follow the EasyNLP latent-diffusion tutorial layout (tab separated, no header):

* ``T2I_train.tsv`` / ``T2I_val.tsv``: ``idx\\ttext\\timgbase64``
* ``T2I_test.tsv`` / ``T2I_heldout.tsv``: ``idx\\ttext``
* ``T2I_heldout_images.tsv``: ``idx\\ttext\\timgbase64`` (same rows as ``T2I_heldout.tsv``)
* ``<split>.truth.jsonl``: one JSON object per row with the exact ground truth.

``judge`` reads colour, shape and background back from pixels only, so it can score
images produced by a diffusion model against the truth sidecars.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

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
_STAR_ASPECT = (1.0 + math.cos(math.radians(36.0))) / (2.0 * math.sin(math.radians(72.0)))  # height / width


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, x0: float, y0: float, x1: float, y1: float, fill) -> None:
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
        h = w * _STAR_ASPECT
    _draw_shape(draw, spec.shape, cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0, COLOURS[spec.colour])
    return big.resize((image_size, image_size), Image.Resampling.BOX)


def image_to_base64(img: Image.Image) -> str:
    """PNG bytes, standard base64, no newlines (deterministic for a given Pillow)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def base64_to_image(data: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    return img.convert("RGB")


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
    for name in COLOURS:
        if name in text:
            out["colour"] = name
    for name in BACKGROUNDS:
        if name in text:
            out["background"] = name
    for name in ALL_SHAPES:
        if name in text:
            out["shape"] = name
    for size in SIZES:
        if size in text:
            out["size"] = size
    phrases = sorted(((ph, pos) for pos, phs in POSITION_PHRASES.items() for ph in phs), key=lambda t: -len(t[0]))
    rest = text
    for ph, pos in phrases:
        if ph in rest:
            out["position"] = pos
            rest = rest.replace(ph, "\0")
    return out


# ----------------------------------------------------------------------------- data set

_IMAGE_SPLITS = ("train", "val")


def _write_atomic(path: str, lines: Iterable[str]) -> int:
    tmp = path + ".tmp"
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
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
    return image_to_base64(render(spec, spec.image_size))


def _truth_line(idx: str, text: str, spec: ShapeSpec, heldout: bool) -> str:
    d = {"idx": idx, "text": text}
    d.update(spec.to_json())
    d["heldout"] = heldout
    return json.dumps(d, ensure_ascii=False)


def _validate(num_train, num_val, num_test, num_heldout, image_size, only_shape) -> None:
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
    file is written to ``<path>.tmp`` and then renamed into place."""
    _validate(num_train, num_val, num_test, num_heldout, image_size, only_shape)
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
            written[tsv] = _write_atomic(tsv, (f"{i}\t{t}\t{b}" for (i, t, _), b in zip(rows, images)))
        else:
            written[tsv] = _write_atomic(tsv, (f"{i}\t{t}" for i, t, _ in rows))
        if heldout:
            p = os.path.join(output_dir, "T2I_heldout_images.tsv")
            written[p] = _write_atomic(p, (f"{i}\t{t}\t{b}" for (i, t, _), b in zip(rows, images)))
        truth = os.path.join(output_dir, f"T2I_{split}.truth.jsonl")
        written[truth] = _write_atomic(truth, (_truth_line(i, t, s, heldout) for i, t, s in rows))
    return written


# ----------------------------------------------------------------------------- judge


class JudgeResult(NamedTuple):
    colour: Optional[str]
    shape: Optional[str]
    background: Optional[str]


def _to_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3].astype(np.float32)
    if arr.size and np.issubdtype(np.asarray(image).dtype, np.floating) and arr.max() <= 1.0 + 1e-6:
        arr = arr * 255.0 if arr.min() >= -1e-6 else (arr + 1.0) * 127.5  # [0,1] or [-1,1]
    return arr


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component, via row runs + union-find (fast for small masks)."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    runs_per_row = []
    parent: list[int] = []
    starts_all: list[tuple[int, int, int]] = []

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for y in range(h):
        s = np.flatnonzero(d[y] == 1)
        e = np.flatnonzero(d[y] == -1)  # exclusive ends
        row = []
        for a, b in zip(s.tolist(), e.tolist()):
            rid = len(parent)
            parent.append(rid)
            starts_all.append((y, a, b))
            row.append((a, b, rid))
        if y > 0 and row and runs_per_row[-1]:
            prev = runs_per_row[-1]
            j = 0
            for a, b, rid in row:
                while j < len(prev) and prev[j][1] < a:  # prev ends (exclusive) before a-1 → no touch
                    j += 1
                k = j
                while k < len(prev) and prev[k][0] <= b:  # 8-connectivity: touch if ranges within 1
                    ra, rb = find(rid), find(prev[k][2])
                    if ra != rb:
                        parent[ra] = rb
                    k += 1
        runs_per_row.append(row)
    if not parent:
        return mask.copy()
    sizes: dict[int, int] = {}
    for rid, (_, a, b) in enumerate(starts_all):
        r = find(rid)
        sizes[r] = sizes.get(r, 0) + (b - a)
    best = max(sizes, key=lambda r: sizes[r])
    out = np.zeros_like(mask, dtype=bool)
    for rid, (y, a, b) in enumerate(starts_all):
        if find(rid) == best:
            out[y, a:b] = True
    return out


# Shape templates: each shape drawn large, blurred by a few amounts (sigma relative to the shape's
# size), thresholded at half coverage, cropped to its bounding box and resized to K×K.  The judge
# thresholds the observed coverage the same way, so mild blur (which rounds corners and retracts
# star tips) is matched by a blurred template.  Blur above ~0.08 makes a star indistinguishable
# from a circle, so the bank stops there.
_BANK_K = 48
_BANK_LEVELS = (0.0, 0.03, 0.06, 0.08)
_BANK: dict = {}


def _template_bank() -> dict:
    if not _BANK:
        base = 192
        pad = int(4 * max(_BANK_LEVELS) * base) + 4
        side = base + 2 * pad
        for shape in ALL_SHAPES:
            tpls = []
            for level in _BANK_LEVELS:
                im = Image.new("L", (side, side), 0)
                h = base * (_STAR_ASPECT if shape == STAR else 1.0)
                _draw_shape(ImageDraw.Draw(im), shape, pad, pad, pad + base, pad + h, 255)
                if level > 0:
                    im = im.filter(ImageFilter.GaussianBlur(level * base))
                a = np.asarray(im) > 127
                ys, xs = np.nonzero(a)
                crop = Image.fromarray((a[ys.min():ys.max() + 1, xs.min():xs.max() + 1] * 255).astype(np.uint8))
                tpls.append(np.asarray(crop.resize((_BANK_K, _BANK_K), Image.Resampling.BOX), dtype=np.float32) / 255)
            _BANK[shape] = tpls
    return _BANK


def _dilate(m: np.ndarray) -> np.ndarray:
    d = m.copy()
    d[1:] |= m[:-1]
    d[:-1] |= m[1:]
    e = d.copy()
    e[:, 1:] |= d[:, :-1]
    e[:, :-1] |= d[:, 1:]
    return e


def judge_details(image, *, shapes: Sequence[str] = ALL_SHAPES) -> dict:
    """Like :func:`judge` but returns a dict with intermediate measurements: colour, shape,
    background, fg_rgb, bg_rgb, bbox (x0, y0, x1, y1; exclusive ends), fill (soft area / bbox
    area), area_frac (foreground pixels / image pixels) and shape_scores (best IoU per shape)."""
    arr = _to_array(image)
    h, w = arr.shape[:2]
    out: dict = {"colour": None, "shape": None, "background": None, "fg_rgb": None, "bg_rgb": None,
                 "bbox": None, "fill": None, "area_frac": 0.0, "shape_scores": {}}
    if h < 4 or w < 4:
        return out
    # background: per-channel median of a thin border ring (robust while the shape covers < half of it)
    bw = max(1, round(min(h, w) / 64))
    border = np.concatenate([arr[:bw].reshape(-1, 3), arr[-bw:].reshape(-1, 3),
                             arr[:, :bw].reshape(-1, 3), arr[:, -bw:].reshape(-1, 3)])
    bg = np.median(border, axis=0)
    out["bg_rgb"] = tuple(float(v) for v in bg)
    bg_names = list(BACKGROUNDS)
    bg_pal = np.array([BACKGROUNDS[n] for n in bg_names], dtype=np.float32)
    out["background"] = bg_names[int(np.argmin(((bg_pal - bg) ** 2).sum(1)))]

    # candidates: clearly away from the background (threshold above the border's noise level)
    dist = np.sqrt(((arr - bg) ** 2).sum(-1))
    noise = float(np.median(np.sqrt(((border - bg) ** 2).sum(-1))))
    t0 = max(30.0, 3.0 * noise)
    cand = dist > t0
    min_px = max(4, int(0.0005 * h * w))
    if int(cand.sum()) < min_px:
        return out
    core = cand & (dist >= np.percentile(dist[cand], 50))
    vec = np.median(arr[core], axis=0) - bg
    d2 = float((vec ** 2).sum())
    if d2 <= t0 * t0:
        return out
    # coverage of each pixel along the background→foreground line (linear-mix model of anti-aliasing/blur);
    # the shape is the largest 8-connected blob of pixels that are more than half foreground
    cov = ((arr - bg) @ vec) / d2
    mask = _largest_component((cov > 0.5) & cand)
    n = int(mask.sum())
    if n < min_px:
        return out
    core_px = arr[mask & (cov > 0.75)]
    if len(core_px) < 3:
        core_px = arr[mask]
    fg = np.median(core_px, axis=0)
    out["fg_rgb"] = tuple(float(v) for v in fg)
    names = list(COLOURS)
    pal = np.array([COLOURS[c] for c in names], dtype=np.float32)
    out["colour"] = names[int(np.argmin(((pal - fg) ** 2).sum(1)))]

    ys, xs = np.nonzero(mask)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    out["bbox"] = (x0, y0, x1, y1)
    out["area_frac"] = n / float(h * w)
    near = _dilate(mask)[y0:y1, x0:x1]
    crop = np.clip(cov[y0:y1, x0:x1], 0.0, 1.0) * near
    out["fill"] = float(crop.sum()) / float((x1 - x0) * (y1 - y0))
    k = _BANK_K
    up = Image.fromarray(np.round(crop * 255.0).astype(np.uint8), mode="L").resize((k, k), Image.Resampling.BILINEAR)
    obs = (np.asarray(up) > 127).astype(np.float32)
    bank = _template_bank()
    scores = {}
    for shape in shapes:
        scores[shape] = max(float(np.minimum(obs, t).sum() / max(np.maximum(obs, t).sum(), 1e-6)) for t in bank[shape])
    out["shape_scores"] = scores
    out["shape"] = max(scores, key=lambda s: scores[s])
    return out


def judge(image, *, shapes: Sequence[str] = ALL_SHAPES) -> JudgeResult:
    """Read (colour, shape, background) from pixels only.  ``image`` is a PIL image or an
    HWC/CHW array (uint8, or float in [0,1] / [-1,1]).  colour and shape are None when no
    foreground object is found.  Shape = best soft-IoU of circle/square/triangle/star
    templates fitted to the bounding box of the largest foreground component."""
    d = judge_details(image, shapes=shapes)
    return JudgeResult(d["colour"], d["shape"], d["background"])


def load_truth(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def judge_agreement(tsv_path: str, truth_path: str) -> dict:
    """Judge every image row of ``tsv_path`` (``idx\\t...\\timgbase64``; idx = first column,
    image = last column, rows matched to the truth by idx, order irrelevant) and count
    agreement with ``truth_path``.  Returns n, colour/shape/both/background counts and
    accuracies, no_foreground (images where nothing was found) and missing (rows whose
    idx is not in the truth file)."""
    truth = {r["idx"]: r for r in load_truth(truth_path)}
    n = colour_ok = shape_ok = both_ok = bg_ok = nofg = missing = 0
    with open(tsv_path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n").rstrip("\r")
            if not line:
                continue
            cols = line.split("\t")
            if len(cols) < 2:
                raise ValueError(f"{tsv_path}: row without an image column")
            t = truth.get(cols[0])
            if t is None:
                missing += 1
                continue
            res = judge(base64_to_image(cols[-1]))
            n += 1
            c_ok, s_ok = res.colour == t["colour"], res.shape == t["shape"]
            colour_ok += c_ok
            shape_ok += s_ok
            both_ok += c_ok and s_ok
            bg_ok += res.background == t["background"]
            nofg += res.colour is None
    def acc(k: int) -> float:
        return k / n if n else 0.0

    return {"n": n, "colour_correct": colour_ok, "shape_correct": shape_ok, "both_correct": both_ok,
            "background_correct": bg_ok, "colour_acc": acc(colour_ok), "shape_acc": acc(shape_ok),
            "both_acc": acc(both_ok), "background_acc": acc(bg_ok), "no_foreground": nofg, "missing": missing}


# ----------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line on stderr, exit 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Generate the Chinese shapes text-to-image data set (EasyNLP TSV format).")
    p.add_argument("--output_dir", required=True, help="directory for T2I_*.tsv and *.truth.jsonl")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_train", type=int, default=20000)
    p.add_argument("--num_val", type=int, default=1000)
    p.add_argument("--num_test", type=int, default=1000)
    p.add_argument("--num_heldout", type=int, default=500)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--only_shape", default=None, help=f"one of {' '.join(ALL_SHAPES)} (e.g. {STAR} for fine-tuning)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(prog=os.path.basename(sys.argv[0]) if argv is None else "make_shapes_dataset.py")
    args = parser.parse_args(argv)
    try:
        _validate(args.num_train, args.num_val, args.num_test, args.num_heldout, args.image_size, args.only_shape)
    except ValueError as e:
        parser.error(str(e))
    try:
        written = generate_dataset(args.output_dir, seed=args.seed, num_train=args.num_train, num_val=args.num_val,
                                   num_test=args.num_test, num_heldout=args.num_heldout, image_size=args.image_size,
                                   only_shape=args.only_shape)
    except OSError as e:
        sys.stderr.write(f"{parser.prog}: error: {e}\n")
        return 1
    for path, rows in written.items():
        print(f"wrote {path} ({rows} rows)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
