"""The pixel judge: colour, shape, background, size (大/小) and position (3×3 grid) read back from an image's pixels.

It scores images produced by a diffusion model against the data set's truth sidecars
(``<split>.truth.jsonl``, see :mod:`shapes_data.generate`).  ``AccuracyCounter`` counts
correct/total per group and attribute for any such scoring.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from easynlp_ldm.tables import decode_image_base64
from shapes_data.generate import (
    ALL_SHAPES,
    BACKGROUNDS,
    COLOURS,
    POSITION_CELLS,
    SIZE_RANGES,
    STAR,
    STAR_ASPECT,
    draw_shape,
)


class JudgeResult(NamedTuple):
    colour: Optional[str]
    shape: Optional[str]
    background: Optional[str]
    size: Optional[str] = None
    position: Optional[str] = None


# 大 or 小 from the larger side of the foreground's bounding box relative to the image side: halfway between the
# data set's two SIZE_RANGES (小 0.25-0.35, 大 0.50-0.60), so blur or a slightly mis-sized shape still reads right.
SIZE_THRESHOLD = 0.5 * (SIZE_RANGES["小"][1] + SIZE_RANGES["大"][0])


def size_of_bbox(bbox: tuple[int, int, int, int], width: int, height: int) -> str:
    """大 or 小 for a bounding box (x0, y0, x1, y1; exclusive ends) in a ``width`` × ``height`` image."""
    x0, y0, x1, y1 = bbox
    side = max((x1 - x0) / float(width), (y1 - y0) / float(height))
    return "大" if side >= SIZE_THRESHOLD else "小"


def position_of_bbox(bbox: tuple[int, int, int, int], width: int, height: int) -> str:
    """The 3×3 grid cell (one of POSITIONS) that holds the centre of a bounding box (x0, y0, x1, y1; exclusive ends)."""
    x0, y0, x1, y1 = bbox
    col = min(2, max(0, int(3.0 * (x0 + x1) / 2.0 / width)))
    row = min(2, max(0, int(3.0 * (y0 + y1) / 2.0 / height)))
    return _CELL_NAMES[(col, row)]


_CELL_NAMES = {cell: name for name, cell in POSITION_CELLS.items()}


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
                h = base * (STAR_ASPECT if shape == STAR else 1.0)
                draw_shape(ImageDraw.Draw(im), shape, pad, pad, pad + base, pad + h, 255)
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
    background, size (大/小 from the bbox's larger side), position (3×3 cell of the bbox centre),
    fg_rgb, bg_rgb, bbox (x0, y0, x1, y1; exclusive ends), fill (soft area / bbox area),
    area_frac (foreground pixels / image pixels) and shape_scores (best IoU per shape)."""
    arr = _to_array(image)
    h, w = arr.shape[:2]
    out: dict = {"colour": None, "shape": None, "background": None, "size": None, "position": None,
                 "fg_rgb": None, "bg_rgb": None,
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
    out["size"] = size_of_bbox(out["bbox"], w, h)
    out["position"] = position_of_bbox(out["bbox"], w, h)
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
    """Read (colour, shape, background, size, position) from pixels only.  ``image`` is a PIL
    image or an HWC/CHW array (uint8, or float in [0,1] / [-1,1]).  colour, shape, size and
    position are None when no foreground object is found.  Shape = best soft-IoU of
    circle/square/triangle/star templates fitted to the bounding box of the largest foreground
    component; size = 大 when that box's larger side is at least SIZE_THRESHOLD of the image
    side; position = the 3×3 grid cell (POSITIONS) holding the box's centre.  The first three
    fields keep their old places, so ``verdict[:3]`` is the old (colour, shape, background)."""
    d = judge_details(image, shapes=shapes)
    return JudgeResult(d["colour"], d["shape"], d["background"], d["size"], d["position"])


def load_truth(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class AccuracyCounter:
    """Correct/total counts per group and attribute.

    ``add(group, colour=True, shape=False, ...)`` once per judged image; ``group(name)`` gives
    ``{"n", "<attribute>_correct", "<attribute>_acc", ...}`` for every declared attribute (accuracy 0.0
    for an empty group) and ``summary()`` that dict for every group seen, by group name.

    With ``per_attribute_n=True`` an attribute may be None in ``add`` (not judged for that image: the
    prompt does not state it) and each attribute gets its own count: ``group`` then gives ``{"n",
    "<attribute>_n", "<attribute>_correct", "<attribute>_acc", ...}`` with accuracy = correct / that
    attribute's n (0.0 when it is 0); ``n`` still counts every image added."""

    def __init__(self, attributes: Sequence[str] = ("colour", "shape", "both"), *, per_attribute_n: bool = False):
        self.attributes = tuple(attributes)
        self.per_attribute_n = per_attribute_n
        self._counts: dict[str, Counter] = {}

    def add(self, group: str = "all", **attribute_ok: Optional[bool]) -> None:
        unknown = sorted(set(attribute_ok) - set(self.attributes))
        if unknown:
            raise ValueError(f"unknown attribute(s) {', '.join(unknown)}; declared: {', '.join(self.attributes)}")
        counts = self._counts.setdefault(group, Counter())
        counts["n"] += 1
        for name, ok in attribute_ok.items():
            if self.per_attribute_n:
                if ok is None:
                    continue
                counts[f"{name}_n"] += 1
            counts[name] += bool(ok)

    def group(self, name: str = "all") -> dict:
        counts = self._counts.get(name, Counter())
        n = counts["n"]
        out: dict = {"n": n}
        for attribute in self.attributes:
            total = counts[f"{attribute}_n"] if self.per_attribute_n else n
            if self.per_attribute_n:
                out[f"{attribute}_n"] = total
            out[f"{attribute}_correct"] = counts[attribute]
            out[f"{attribute}_acc"] = counts[attribute] / total if total else 0.0
        return out

    def summary(self) -> dict[str, dict]:
        return {name: self.group(name) for name in sorted(self._counts)}


def judge_agreement(tsv_path: str, truth_path: str) -> dict:
    """Judge every image row of ``tsv_path`` (``idx\\t...\\timgbase64``; idx = first column,
    image = last column, rows matched to the truth by idx, order irrelevant) and count
    agreement with ``truth_path``.  Returns n, colour/shape/both/background/size/position counts
    and accuracies, no_foreground (images where nothing was found) and missing (rows whose
    idx is not in the truth file)."""
    truth = {r["idx"]: r for r in load_truth(truth_path)}
    counter = AccuracyCounter(("colour", "shape", "both", "background", "size", "position"))
    no_foreground = missing = 0
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
            res = judge(decode_image_base64(cols[-1]))
            colour_ok, shape_ok = res.colour == t["colour"], res.shape == t["shape"]
            counter.add(colour=colour_ok, shape=shape_ok, both=colour_ok and shape_ok,
                        background=res.background == t["background"], size=res.size == t["size"],
                        position=res.position == t["position"])
            no_foreground += res.colour is None
    return {**counter.group(), "no_foreground": no_foreground, "missing": missing}
