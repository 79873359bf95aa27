"""Tests for the Chinese shapes data set generator (shapes_data.generate) and its command line."""

import os
import random
import re
import subprocess
import sys

import pytest

import shapes_data as S
from tests.shapes_data.expected import (
    ALL_FILES,
    BACKGROUND_NAMES,
    COLOUR_NAMES,
    COUNTS,
    GRID,
    LAYOUT,
    POSITION_WORDS,
    SHAPE_NAMES,
    STAR_FILES,
    TRUTH_KEYS,
    decode_png,
    read_rows,
    read_truth,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "make_shapes_dataset.py")


# ----------------------------------------------------------------------------- file formats


def test_files_and_formats(dataset):
    assert {p.name for p in dataset.iterdir()} == ALL_FILES  # no *.tmp leftovers either
    seen_idx = {}
    for name, ncols, truth_name, key in LAYOUT:
        rows = read_rows(dataset / name)
        truth = read_truth(dataset / truth_name)
        assert len(rows) == COUNTS[key] == len(truth), name
        for row, t in zip(rows, truth):
            assert len(row) == ncols, (name, row[:2])
            assert [row[0], row[1]] == [t["idx"], t["text"]]
            assert TRUTH_KEYS <= set(t)
            assert isinstance(t["heldout"], bool) and t["heldout"] == ("heldout" in name)
        for row in rows[:5]:
            assert re.fullmatch(r"[a-z]+_\d{6}", row[0])  # first row is data, not a header
        if ncols == 3:
            for row in rows[:50]:
                img = decode_png(row[2])
                assert img.size == (64, 64) and img.mode == "RGB"
        if name != "T2I_heldout_images.tsv":  # same rows as T2I_heldout.tsv by design
            for row in rows:
                assert row[0] not in seen_idx, f"duplicate idx {row[0]} in {name} and {seen_idx.get(row[0])}"
                seen_idx[row[0]] = name
    assert read_rows(dataset / "T2I_heldout.tsv") == [r[:2] for r in read_rows(dataset / "T2I_heldout_images.tsv")]


def test_image_size_option(tmp_path):
    S.generate_dataset(str(tmp_path), seed=3, num_train=5, num_val=5, num_test=5, num_heldout=5, image_size=96)
    for name in ("T2I_train.tsv", "T2I_val.tsv", "T2I_heldout_images.tsv"):
        for row in read_rows(tmp_path / name):
            assert decode_png(row[2]).size == (96, 96)
    for t in read_truth(tmp_path / "T2I_train.truth.jsonl"):
        assert t["extent"] / 2 <= t["cx"] <= 96 - t["extent"] / 2


def test_deterministic(dataset, tmp_path):
    same, other = tmp_path / "same", tmp_path / "other"
    S.generate_dataset(str(same), seed=0, image_size=64, **COUNTS)
    S.generate_dataset(str(other), seed=1, image_size=64, **COUNTS)
    for name in ALL_FILES:
        assert (same / name).read_bytes() == (dataset / name).read_bytes(), name
        assert (other / name).read_bytes() != (dataset / name).read_bytes(), name


# ----------------------------------------------------------------------------- content


def test_heldout_pairs_and_star(dataset):
    heldout = {tuple(p) for p in S.HELDOUT_PAIRS}
    assert len(heldout) == 3
    for split in ("train", "val", "test"):
        truth = read_truth(dataset / f"T2I_{split}.truth.jsonl")
        for t in truth:
            assert (t["colour"], t["shape"]) not in heldout
            assert t["shape"] in ("圆形", "正方形", "三角形")
            assert "星形" not in t["text"]
        # every other colour/shape combination is present in the training data
        if split == "train":
            assert {(t["colour"], t["shape"]) for t in truth} == {
                (c, s) for c in COLOUR_NAMES for s in ("圆形", "正方形", "三角形") if (c, s) not in heldout
            }
    held = read_truth(dataset / "T2I_heldout.truth.jsonl")
    assert {(t["colour"], t["shape"]) for t in held} == heldout
    assert all(t["heldout"] for t in held)


def test_only_shape_star(star_dataset):
    assert {p.name for p in star_dataset.iterdir()} == STAR_FILES
    colours = set()
    for split in ("train", "val", "test"):
        truth = read_truth(star_dataset / f"T2I_{split}.truth.jsonl")
        for t in truth:
            assert t["shape"] == "星形" and "星形" in t["text"] and not t["heldout"]
            colours.add(t["colour"])
    assert colours == set(COLOUR_NAMES)  # held-out pairs do not apply to the star


def test_geometry(dataset):
    truth = read_truth(dataset / "T2I_train.truth.jsonl") + read_truth(dataset / "T2I_val.truth.jsonl")
    small = [t["extent"] for t in truth if t["size"] == "小"]
    large = [t["extent"] for t in truth if t["size"] == "大"]
    assert small and large and max(small) * 1.25 < min(large)
    assert {t["position"] for t in truth} == set(GRID)
    assert {t["background"] for t in truth} == set(BACKGROUND_NAMES)
    for t in truth:
        half = t["extent"] / 2
        assert half < t["cx"] < 64 - half and half < t["cy"] < 64 - half, t
        col, row = GRID.index(t["position"]) % 3, GRID.index(t["position"]) // 3
        assert col * 64 / 3 <= t["cx"] < (col + 1) * 64 / 3, t
        assert row * 64 / 3 <= t["cy"] < (row + 1) * 64 / 3, t


def test_captions_truthful_and_varied(dataset):
    truth = []
    for split in ("train", "val", "test", "heldout"):
        truth += read_truth(dataset / f"T2I_{split}.truth.jsonl")
    skeletons, bg_mentions, size_mentions, pos_mentions = set(), 0, 0, 0
    for t in truth:
        text = t["text"]
        assert "\t" not in text and "\n" not in text
        assert t["colour"] in text and t["shape"] in text, t
        assert [c for c in COLOUR_NAMES if c in text] == [t["colour"]], text
        assert [s for s in SHAPE_NAMES if s in text] == [t["shape"]], text
        bgs = [b for b in BACKGROUND_NAMES if b in text]
        assert bgs in ([], [t["background"]]), text
        bg_mentions += bool(bgs)
        if "大" in text or "小" in text:
            size_mentions += 1
            assert ("大" in text) == (t["size"] == "大") and ("小" in text) == (t["size"] == "小"), text
        found, rest = set(), text
        for word in sorted(POSITION_WORDS, key=len, reverse=True):
            if word in rest:
                found.add(POSITION_WORDS[word])
                rest = rest.replace(word, "#")
        assert found <= {t["position"]}, text
        pos_mentions += bool(found)
        if "左" in text:
            assert t["position"] in ("左上", "左边", "左下"), text
        if "右" in text:
            assert t["position"] in ("右上", "右边", "右下"), text
        if "下" in text:
            assert t["position"] in ("左下", "下方", "右下"), text
        sk = rest.replace(t["colour"], "C").replace(t["shape"], "S").replace(t["background"], "B")
        for z in ("大大的", "小小的", "大的", "小的"):
            sk = sk.replace(z, "Z")
        skeletons.add(sk.replace("C的S", "CS"))
    n = len(truth)
    assert bg_mentions >= 0.6 * n
    assert 0.1 * n <= size_mentions <= 0.8 * n
    assert 0.1 * n <= pos_mentions <= 0.8 * n
    assert len(skeletons) >= 8, skeletons


def test_parse_caption_roundtrip():
    rng = random.Random(7)
    for _ in range(300):
        spec = S.sample_spec(rng, shapes=S.ALL_SHAPES)
        p = S.parse_caption(S.caption(spec, rng))
        assert p["colour"] == spec.colour and p["shape"] == spec.shape
        for key in ("background", "size", "position"):
            assert p[key] in (None, getattr(spec, key))


def test_sample_spec_pairs_allowed():
    rng = random.Random(0)
    only = {("红色", "圆形")}
    assert {(s.colour, s.shape) for s in (S.sample_spec(rng, pairs_allowed=only) for _ in range(20))} == only
    specs = [S.sample_spec(rng, pairs_allowed=lambda c, s: c == "蓝色") for _ in range(30)]
    assert {s.colour for s in specs} == {"蓝色"}


# ----------------------------------------------------------------------------- CLI


def _cli(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "args",
    [
        ["--only_shape", "方块"],
        ["--num_train", "-1"],
        ["--num_heldout", "-5"],
        ["--image_size", "16"],
        ["--seed", "abc"],
        [],  # --output_dir missing
    ],
)
def test_cli_bad_arguments(tmp_path, args):
    if args:
        args = ["--output_dir", str(tmp_path / "out"), *args]
    proc = _cli(*args)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_writes_dataset(tmp_path):
    out = tmp_path / "cli"
    proc = _cli("--output_dir", str(out), "--seed", "4", "--num_train", "7", "--num_val", "3", "--num_test", "2",
                "--num_heldout", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == len(ALL_FILES)
    assert any("T2I_train.tsv" in line and "7" in line for line in lines)
    assert {p.name for p in out.iterdir()} == ALL_FILES
    assert len(read_rows(out / "T2I_train.tsv")) == 7
    proc = _cli("--output_dir", str(tmp_path / "star"), "--num_train", "4", "--num_val", "2", "--num_test", "2",
                "--only_shape", "星形")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / "star").iterdir()} == STAR_FILES
