import json
import os

import shapes_data as shapes
from appzoo.latent_diffusion import predict
from easynlp_ldm import cli


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
                                                             "cx", "cy", "extent")}, image_size=64)
            images.append(shapes.render(spec))
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
    assert metrics["accuracy"]["seen"] == {"n": 6, "colour_acc": 1.0, "shape_acc": 1.0, "both_acc": 1.0,
                                           "colour_correct": 6, "shape_correct": 6, "both_correct": 6}
    fake_generator(monkeypatch, os.path.join(shapes_data, "T2I_heldout.truth.jsonl"))
    metrics = evaluate(os.path.join(shapes_data, "T2I_heldout.tsv"), tiny_model_dir, tmp_path, capsys)
    assert metrics["accuracy"]["heldout"]["both_acc"] == 1.0 and "seen" not in metrics["accuracy"]


def test_wrong_colours_are_counted_wrong(tiny_model_dir, shapes_data, tmp_path, capsys, monkeypatch):
    def swap(record):
        record["colour"] = "绿色" if record["colour"] != "绿色" else "红色"
        return record

    fake_generator(monkeypatch, os.path.join(shapes_data, "T2I_test.truth.jsonl"), swap)
    accuracy = evaluate(os.path.join(shapes_data, "T2I_test.tsv"), tiny_model_dir, tmp_path, capsys)["accuracy"]
    assert accuracy["seen"]["colour_acc"] == 0.0 and accuracy["seen"]["shape_acc"] == 1.0
    assert accuracy["seen"]["both_acc"] == 0.0


def test_real_generation_runs_and_nothing_to_evaluate_is_an_error(tiny_model_dir, shapes_data, tmp_path, capsys):
    metrics = evaluate(os.path.join(shapes_data, "T2I_test.tsv"), tiny_model_dir, tmp_path, capsys)
    assert metrics["accuracy"]["all"]["n"] == 6
    bare = tmp_path / "bare.tsv"
    bare.write_text("1\t红色\n", encoding="utf-8")
    assert cli.main(["--mode=evaluate", f"--tables={bare}", "--input_schema=idx:str:1,text:str:1",
                     f"--checkpoint_dir={tiny_model_dir}"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
