import json
import os
import random

import pytest

import shapes_data as shapes
from appzoo.latent_diffusion import predict
from easynlp_ldm import cli
from shapes_data.generate import POSITION_CELLS, POSITIONS, SIZE_RANGES, _sample_centre


def truth_records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def fake_generator(monkeypatch, truth_file, mutate=None):
    """Replace image generation by the data set's own renders (optionally altered): checks the metric's plumbing."""
    by_caption = {r["text"]: r for r in truth_records(truth_file)}

    def generate(self, prompts, seeds):
        images = []
        for prompt in prompts:
            record = dict(by_caption[prompt])
            if mutate:
                record = mutate(record)
            spec = shapes.ShapeSpec(**{k: record[k] for k in ("colour", "shape", "background", "size", "position",
                                                             "cx", "cy", "extent", "image_size")})
            images.append(shapes.render(spec, 64))
        return images

    monkeypatch.setattr(predict.Generator, "__call__", generate)


def evaluate(table, model, tmp_path, capsys, *udp):
    capsys.readouterr()
    assert cli.main(["--mode=evaluate", f"--tables={table}", "--input_schema=idx:str:1,text:str:1",
                     f"--checkpoint_dir={model}", "--micro_batch_size=4",
                     f"--user_defined_parameters=ddim_steps=2 {' '.join(udp)}"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_accuracy_is_one_for_true_images_and_split_by_heldout(tiny_model_dir, shapes_data, tmp_path, capsys,
                                                             monkeypatch):
    fake_generator(monkeypatch, os.path.join(shapes_data, "T2I_test.truth.jsonl"))
    metrics = evaluate(os.path.join(shapes_data, "T2I_test.tsv"), tiny_model_dir, tmp_path, capsys)
    expected_n = stated_counts(os.path.join(shapes_data, "T2I_test.truth.jsonl"))
    assert expected_n["background"] == 6 and 0 < expected_n["size"] < 6 and 0 < expected_n["position"] < 6
    assert metrics["accuracy"]["seen"] == perfect(6, expected_n)
    assert metrics["accuracy"]["all"] == metrics["accuracy"]["seen"] and "heldout" not in metrics["accuracy"]
    fake_generator(monkeypatch, os.path.join(shapes_data, "T2I_heldout.truth.jsonl"))
    metrics = evaluate(os.path.join(shapes_data, "T2I_heldout.tsv"), tiny_model_dir, tmp_path, capsys)
    assert metrics["accuracy"]["heldout"] == perfect(4, stated_counts(os.path.join(shapes_data,
                                                                                   "T2I_heldout.truth.jsonl")))
    assert "seen" not in metrics["accuracy"]


def stated_counts(truth_file):
    """Prompts stating each attribute, counted from the captions independently of evaluate's code."""
    phrases = {"background": ("背景", "底色"), "size": ("大的", "小的"),
               "position": ("左上角", "右上角", "左下角", "右下角", "上方", "顶部", "下方", "底部", "左边", "左侧",
                            "右边", "右侧", "中间", "中央")}
    texts = [r["text"] for r in truth_records(truth_file)]
    return {a: sum(any(p in t for p in ps) for t in texts) for a, ps in phrases.items()}


def perfect(n, stated_n):
    out = {"n": n}
    for attribute in ("colour", "shape", "both", "background", "size", "position", "all_stated"):
        k = stated_n.get(attribute, n)
        out.update({f"{attribute}_n": k, f"{attribute}_correct": k, f"{attribute}_acc": 1.0})
    return out


def test_wrong_colours_are_counted_wrong(tiny_model_dir, shapes_data, tmp_path, capsys, monkeypatch):
    def swap(record):
        record["colour"] = "绿色" if record["colour"] != "绿色" else "红色"
        return record

    fake_generator(monkeypatch, os.path.join(shapes_data, "T2I_test.truth.jsonl"), swap)
    accuracy = evaluate(os.path.join(shapes_data, "T2I_test.tsv"), tiny_model_dir, tmp_path, capsys)["accuracy"]
    assert accuracy["seen"]["colour_acc"] == 0.0 and accuracy["seen"]["shape_acc"] == 1.0
    assert accuracy["seen"]["both_acc"] == 0.0


def other_cell(record):
    """The record moved to the opposite 3×3 cell (the centre cell to the top-left one), same size."""
    col, row = POSITION_CELLS[record["position"]]
    col, row = (2 - col if col != 1 else 0), (2 - row if row != 1 else 0)
    rng = random.Random(0)
    record["position"] = POSITIONS[row * 3 + col]
    record["cx"] = _sample_centre(rng, col, record["extent"], record["image_size"])
    record["cy"] = _sample_centre(rng, row, record["extent"], record["image_size"])
    return record


def other_size(record):
    """The record drawn at the other size (in the same cell)."""
    record["size"] = "大" if record["size"] == "小" else "小"
    lo, hi = SIZE_RANGES[record["size"]]
    record["extent"] = (lo + hi) / 2 * record["image_size"]
    col, row = POSITION_CELLS[record["position"]]
    rng = random.Random(0)
    record["cx"] = _sample_centre(rng, col, record["extent"], record["image_size"])
    record["cy"] = _sample_centre(rng, row, record["extent"], record["image_size"])
    return record


@pytest.mark.parametrize("mutate, wrong", [(other_cell, "position"), (other_size, "size")])
def test_wrong_position_or_size_is_counted_wrong_only_where_stated(tiny_model_dir, shapes_data, tmp_path, capsys,
                                                                   monkeypatch, mutate, wrong):
    truth_file = os.path.join(shapes_data, "T2I_test.truth.jsonl")
    fake_generator(monkeypatch, truth_file, mutate)
    seen = evaluate(os.path.join(shapes_data, "T2I_test.tsv"), tiny_model_dir, tmp_path, capsys)["accuracy"]["seen"]
    stated_n = stated_counts(truth_file)
    assert seen[f"{wrong}_n"] == stated_n[wrong] > 0
    assert seen[f"{wrong}_correct"] == 0 and seen[f"{wrong}_acc"] == 0.0
    for right in {"colour", "shape", "both", "background", "size", "position"} - {wrong}:
        assert seen[f"{right}_acc"] == 1.0, (right, seen)
    assert seen["all_stated_n"] == 6 and seen["all_stated_correct"] == 6 - stated_n[wrong]
    assert seen["colour_acc"] == seen["shape_acc"] == seen["both_acc"] == 1.0  # the old keys are unchanged


def test_contradicting_truth_is_an_error(tiny_model_dir, shapes_data, tmp_path, capsys, monkeypatch):
    records = truth_records(os.path.join(shapes_data, "T2I_test.truth.jsonl"))
    table, truth = tmp_path / "t.tsv", tmp_path / "t.truth.jsonl"
    table.write_text("".join(f"{r['idx']}\t{r['text']}\n" for r in records), encoding="utf-8")
    sized = next(r for r in records if "小的" in r["text"] or "大的" in r["text"])
    sized["size"] = "大" if "小的" in sized["text"] else "小"
    truth.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    fake_generator(monkeypatch, str(truth))
    capsys.readouterr()
    assert cli.main(["--mode=evaluate", f"--tables={table}", "--input_schema=idx:str:1,text:str:1",
                     f"--checkpoint_dir={tiny_model_dir}", "--user_defined_parameters=ddim_steps=2"]) == 2
    err = capsys.readouterr().err
    assert "says size" in err and "does not belong to this table" in err, err


def test_real_generation_runs_and_nothing_to_evaluate_is_an_error(tiny_model_dir, shapes_data, tmp_path, capsys):
    metrics = evaluate(os.path.join(shapes_data, "T2I_test.tsv"), tiny_model_dir, tmp_path, capsys)
    assert metrics["accuracy"]["all"]["n"] == 6
    bare = tmp_path / "bare.tsv"
    bare.write_text("1\t红色\n", encoding="utf-8")
    assert cli.main(["--mode=evaluate", f"--tables={bare}", "--input_schema=idx:str:1,text:str:1",
                     f"--checkpoint_dir={tiny_model_dir}"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
