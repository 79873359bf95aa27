"""The layout ControlNet's data and metric (issue 17, item 5): shapes_data/layouts.py and
bench/layout_controlnet.py."""

import json

import numpy as np
import pytest

from easynlp_ldm.tables import decode_image_base64
from shapes_data.cli import layout_main
from shapes_data.generate import ShapeSpec
from shapes_data.judge import judge_details
from shapes_data.layouts import (
    LAYOUT_GREY,
    bbox_centre,
    in_box,
    layout_box,
    make_layout_dataset,
    render_layout,
    shape_box,
)


@pytest.fixture(scope="module")
def layout_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("layout")
    make_layout_dataset(str(out), seed=0, num_train=120, num_val=8, num_test=20)
    return out


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").split("\t") for line in f]


def _truth(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_the_layout_box_holds_the_rendered_shape_for_every_training_row(layout_dir):
    rows, truth = _rows(layout_dir / "T2I_train.tsv"), _truth(layout_dir / "T2I_train.truth.jsonl")
    assert len(rows) == len(truth) == 120
    for cells, t in zip(rows, truth):
        assert len(cells) == 4 and cells[0] == t["idx"] and cells[1] == t["text"]
        image, control = decode_image_base64(cells[2]).convert("RGB"), decode_image_base64(cells[3]).convert("RGB")
        assert image.size == control.size == (64, 64)
        judged = judge_details(image)
        assert judged["colour"] == t["colour"] and judged["shape"] == t["shape"], t["idx"]
        assert in_box(judged["bbox"], t["box"]), (t["idx"], judged["bbox"], t["box"])
        # the control image is exactly the truth's box: grey inside, black outside
        a = np.asarray(control)
        x0, y0, x1, y1 = t["box"]
        grey = np.zeros((64, 64), dtype=bool)
        grey[y0:y1, x0:x1] = True
        assert (a[grey] == LAYOUT_GREY).all() and (a[~grey] == 0).all()
        # the whole shape's box lies in the layout box (rough, but never cutting the shape)
        sx0, sy0, sx1, sy1 = shape_box(ShapeSpec(**t["spec"]))
        assert x0 <= sx0 + 1e-6 and y0 <= sy0 + 1e-6 and sx1 <= x1 + 1e-6 and sy1 <= y1 + 1e-6
    # layouts are rough: most boxes are larger than the exact box rounded outwards
    exact = [layout_box(ShapeSpec(**t["spec"])) for t in truth]
    assert sum(tuple(t["box"]) != e for t, e in zip(truth, exact)) > 60


def test_test_table_and_determinism(layout_dir, tmp_path):
    rows, truth = _rows(layout_dir / "layout_test.tsv"), _truth(layout_dir / "layout_test.truth.jsonl")
    assert len(rows) == len(truth) == 20 and all(len(c) == 3 for c in rows)
    assert {t["shape"] for t in truth} <= {"圆形", "正方形", "三角形"}
    make_layout_dataset(str(tmp_path), seed=0, num_train=120, num_val=8, num_test=20)
    for name in ("T2I_train.tsv", "layout_test.tsv", "layout_test.truth.jsonl"):
        assert (tmp_path / name).read_bytes() == (layout_dir / name).read_bytes()


def test_the_command_line_writes_the_same_tables(layout_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    # each split draws from its own RNG, so a CLI run without training rows still writes the same val and test tables
    assert layout_main(["--output_dir", str(out), "--num_train", "0", "--num_val", "8", "--num_test", "20"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{out / 'layout_test.truth.jsonl'}: 20 rows"
    for name in ("T2I_val.tsv", "layout_test.tsv", "layout_test.truth.jsonl"):
        assert (out / name).read_bytes() == (layout_dir / name).read_bytes()


def test_in_box_metric_on_constructed_cases():
    box = (10, 20, 30, 40)  # pixel edges
    assert bbox_centre((10, 20, 30, 40)) == (20.0, 30.0)
    assert in_box((10, 20, 30, 40), box)  # the box itself
    assert in_box((0, 10, 20, 30), box)  # centre (10, 20): on the corner edge counts
    assert in_box((25, 35, 35, 45), box)  # centre (30, 40): the far edges count
    assert not in_box((25, 35, 36, 45), box)  # centre (30.5, 40): half a pixel out
    assert not in_box((0, 0, 10, 10), box)
    assert not in_box((12, 0, 18, 10), box)  # x inside, y outside
    assert not in_box(None, box)  # nothing found


def test_in_box_on_rendered_images_and_the_bench_score():
    from bench.layout_controlnet import score

    spec = ShapeSpec("红色", "圆形", "白色", "小", "左上", 12.0, 12.0, 18.0)
    box = layout_box(spec)
    img = render_layout(box)
    assert np.asarray(img)[12, 12].tolist() == [LAYOUT_GREY] * 3 and np.asarray(img)[40, 40].tolist() == [0, 0, 0]
    from shapes_data.generate import render

    right = judge_details(render(spec))
    moved = judge_details(render(ShapeSpec("红色", "正方形", "白色", "小", "右下", 50.0, 50.0, 18.0)))
    blank = judge_details(np.full((64, 64, 3), 255, dtype=np.uint8))
    t = {"box": list(box), "colour": "红色", "shape": "圆形"}
    s = score([(right, t), (moved, t), (blank, t), (right, dict(t, colour="蓝色"))])
    assert s["n"] == 4
    assert (s["in_box"], s["colour"], s["shape"], s["all"], s["found"]) == (2, 2, 2, 1, 3)
    assert s["in_box_acc"] == 0.5 and s["all_acc"] == 0.25
