"""``--mode=evaluate`` with image metrics, evaluate_output and two models compared (evaluate.py, report.py,
comparison.py), on tiny random models and metric models built offline (modelzoo/tiny_metrics.py)."""

import csv
import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from appzoo.latent_diffusion.comparison import paired_bootstrap
from appzoo.latent_diffusion.evaluate import models_to_evaluate
from easynlp_ldm import cli
from easynlp_ldm.errors import UserError

ARGV = ["--mode=evaluate", "--input_schema=idx:str:1,text:str:1", "--micro_batch_size=4"]


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    from modelzoo.tiny_metrics import make_tiny_clip, make_tiny_inception

    root = tmp_path_factory.mktemp("metric_models")
    return {"clip": make_tiny_clip(str(root / "clip")), "preference": make_tiny_clip(str(root / "pref"), kind="clip"),
            "inception": make_tiny_inception(str(root / "inception.pth"))}


def evaluate(table, checkpoint, outputs, *udp, argv=()):
    assert cli.main([*ARGV, f"--tables={table}", f"--checkpoint_dir={checkpoint}", f"--outputs={outputs}", *argv,
                     f"--user_defined_parameters=ddim_steps=2 {' '.join(udp)}"]) == 0
    return json.load(open(outputs, encoding="utf-8"))


def read_scores(folder):
    with open(os.path.join(folder, "scores.tsv"), encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.fixture(scope="module")
def compared(tiny_model_dir, shapes_data, metric_models, tmp_path_factory):
    """The same tiny model twice (A,B) on the shapes test table, with CLIP and preference scores and the judge."""
    out = tmp_path_factory.mktemp("compared")
    summary = evaluate(os.path.join(shapes_data, "T2I_test.tsv"), f"{tiny_model_dir},{tiny_model_dir}",
                       out / "summary.json", f"evaluate_output={out / 'report'}", f"clip_model={metric_models['clip']}",
                       f"preference_model={metric_models['preference']}")
    return summary, str(out / "report")


def test_scores_tsv_has_every_score_per_prompt_per_model_and_the_summary_means_are_its_means(compared):
    summary, folder = compared
    rows = read_scores(folder)
    labels = list(summary["models"])
    assert len(labels) == 2 and labels[0] != labels[1]
    assert [r["model"] for r in rows] == [labels[0]] * 6 + [labels[1]] * 6
    judged = ["judge_colour", "judge_shape", "judge_background", "judge_size", "judge_position", "judge_both",
              "judge_all_stated"]
    assert list(rows[0]) == ["model", "idx", "prompt", "seed", "image", "clip_score", "preference_score", *judged]
    for label in labels:
        mine = [r for r in rows if r["model"] == label]
        metrics = summary["models"][label]
        for name in ("clip_score", "preference_score"):
            assert all(r[name] != "" for r in mine)
            assert metrics[name] == pytest.approx(np.mean([float(r[name]) for r in mine]), abs=1e-9)
        stated = [float(r["judge_all_stated"]) for r in mine if r["judge_all_stated"] != ""]
        assert metrics["accuracy"]["all"]["all_stated_acc"] == pytest.approx(np.mean(stated))
        assert metrics["accuracy"]["all"]["all_stated_n"] == len(stated)
        assert metrics["prompts"] == 6
    assert json.load(open(os.path.join(folder, "summary.json"), encoding="utf-8")) == summary


def test_compare_uses_the_same_seeds_so_the_same_model_twice_gives_identical_images_and_no_difference(compared):
    summary, folder = compared
    rows = read_scores(folder)
    first, second = rows[:6], rows[6:]
    assert [(r["idx"], r["prompt"], r["seed"]) for r in first] == [(r["idx"], r["prompt"], r["seed"]) for r in second]
    for a, b in zip(first, second):
        assert a["image"] != b["image"]
        image_a, image_b = (open(os.path.join(folder, r["image"]), "rb").read() for r in (a, b))
        assert image_a == image_b
    assert summary["difference"]["clip_score"]["difference"] == 0.0
    for name, diff in summary["difference"].items():
        assert diff["difference"] == 0.0 and diff["ci95"] == [0.0, 0.0], name


def test_fid_and_kid_against_a_reference_folder_are_those_of_the_written_images(tiny_model_dir, shapes_data,
                                                                                metric_models, tmp_path):
    from modelzoo.image_metrics import InceptionFeatures, fid, kid
    from shapes_data import ShapeSpec, render

    reference = tmp_path / "reference"
    reference.mkdir()
    records = [json.loads(line) for line in open(os.path.join(shapes_data, "T2I_train.truth.jsonl"), encoding="utf-8")]
    for i, record in enumerate(records[:5]):
        spec = ShapeSpec(**{k: record[k] for k in ("colour", "shape", "background", "size", "position", "cx", "cy",
                                                   "extent", "image_size")})
        render(spec, 32).save(reference / f"{i}.png")
    summary = evaluate(os.path.join(shapes_data, "T2I_test.tsv"), tiny_model_dir, tmp_path / "s.json",
                       f"fid_weights={metric_models['inception']}", f"fid_reference={reference}",
                       f"evaluate_output={tmp_path / 'out'}")
    assert summary["fid_reference_images"] == 5 and summary["prompts"] == 6
    inception = InceptionFeatures(metric_models["inception"])
    real = inception([Image.open(reference / f"{i}.png").convert("RGB") for i in range(5)])
    fake = inception([Image.open(tmp_path / "out" / r["image"]).convert("RGB") for r in read_scores(tmp_path / "out")])
    assert summary["fid"] == pytest.approx(fid(real, fake), rel=1e-6)
    assert (summary["kid"], summary["kid_std"]) == pytest.approx(kid(real, fake), rel=1e-6)
    assert "accuracy" in summary and summary["steps"] == 2  # the truth sidecar is still judged


def test_bootstrap_interval_covers_the_true_difference_and_is_seeded():
    true_difference, covered, trials = 0.5, 0, 200
    for seed in range(trials):
        rng = np.random.default_rng(1000 + seed)
        prompt_effect = rng.normal(0, 2, size=60)  # paired: the prompt moves both models' scores alike
        a = prompt_effect + rng.normal(0, 1, size=60)
        b = prompt_effect + true_difference + rng.normal(0, 1, size=60)
        low, high = paired_bootstrap(a, b, resamples=1000, seed=seed)["ci95"]
        covered += low <= true_difference <= high
    assert covered / trials >= 0.9
    a, b = np.arange(10.0), np.arange(10.0) + np.linspace(0, 1, 10)
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    a[2] = math.nan  # a prompt one model has no score for takes no part
    result = paired_bootstrap(a, b, seed=3)
    assert result["n"] == 9 and result["difference"] == pytest.approx(np.mean(np.delete(b - np.arange(10.0), 2)))


def test_checkpoint_dir_splits_on_a_comma_only_when_it_names_no_path(tmp_path):
    with_comma = tmp_path / "run,v2"
    with_comma.mkdir()
    assert models_to_evaluate(str(with_comma), "") == [str(with_comma)]
    assert models_to_evaluate("a, b", "") == ["a", "b"]
    assert models_to_evaluate("a", "b") == ["a", "b"]
    with pytest.raises(UserError, match="compares two models, got 3"):
        models_to_evaluate("a,b", "c")
    with pytest.raises(UserError, match="name both models"):
        models_to_evaluate("a,", "")


@pytest.mark.parametrize("udp, table, message", [
    ("clip_model={missing}", "T2I_test.tsv", "clip_model=.*missing: no such folder"),
    ("preference_model={clip} preference_processor={missing}", "T2I_test.tsv",
     "preference_processor=.*missing: no such folder"),
    ("fid_weights={missing}", "T2I_test.tsv", "fid_weights=.*missing: no such file"),
    ("fid_weights={inception}", "T2I_test.tsv", "no reference images for FID/KID.*fid_reference="),
    ("fid_weights={inception} fid_reference={empty}", "T2I_test.tsv", "fid_reference=.*0 reference image"),
    ("evaluate_output={out}", "empty.tsv", "no usable rows to evaluate"),
])
def test_user_errors_name_the_parameter(tiny_model_dir, shapes_data, metric_models, tmp_path, capsys, udp, table,
                                        message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.tsv").write_text("", encoding="utf-8")
    folder = str(tmp_path) if table == "empty.tsv" else shapes_data
    udp = udp.format(missing=tmp_path / "missing", inception=metric_models["inception"], empty=tmp_path / "empty",
                     out=tmp_path / "out", clip=metric_models["preference"])
    capsys.readouterr()
    assert cli.main([*ARGV, f"--tables={os.path.join(folder, table)}", f"--checkpoint_dir={tiny_model_dir}",
                     f"--user_defined_parameters=ddim_steps=2 {udp}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and __import__("re").search(message, err), err


def test_report_opens_in_chromium_with_every_image_shown_and_sorts_by_a_score(compared, browser):
    from selenium.webdriver.common.by import By

    summary, folder = compared
    browser.set_window_size(1200, 900)
    browser.get("file://" + os.path.abspath(os.path.join(folder, "report.html")))
    images = browser.find_elements(By.CSS_SELECTOR, "#items img")
    assert len(images) == 12
    assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0
               for image in images)
    label = list(summary["models"])[0]
    button = browser.find_element(By.CSS_SELECTOR, '.sortbar button[data-key="0:preference_score"]')
    assert button.get_attribute("data-label") == "preference score"
    assert browser.execute_script("return arguments[0].parentNode.firstChild.textContent", button) == label
    order = browser.execute_script("return Array.from(document.querySelectorAll('#items .item'))"
                                   ".map(e => e.dataset.i)")
    scores = [float(r["preference_score"]) for r in read_scores(folder)[:6]]
    button.click()
    descending = browser.execute_script("return Array.from(document.querySelectorAll('#items .item'))"
                                        ".map(e => e.dataset.i)")
    assert [scores[int(i)] for i in descending] == sorted(scores, reverse=True)
    button.click()
    ascending = browser.execute_script("return Array.from(document.querySelectorAll('#items .item'))"
                                       ".map(e => e.dataset.i)")
    assert [scores[int(i)] for i in ascending] == sorted(scores)
    assert sorted(order) == sorted(ascending)
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    assert len(shot.getcolors(1 << 24)) > 10  # not blank: text, images, borders


def test_a_dit_and_an_sd_model_compared_on_a_table_with_images(tiny_model_dir, shapes_data, tmp_path):
    from modelzoo.tiny_dit import make_tiny_zimage_model

    dit = make_tiny_zimage_model(str(tmp_path / "zimage"))
    summary = evaluate(os.path.join(shapes_data, "T2I_val.tsv"), tiny_model_dir, tmp_path / "s.json",
                       f"compare_with={dit}", f"evaluate_output={tmp_path / 'out'}",
                       argv=["--input_schema=idx:str:1,text:str:1,imgbase64:str:1"])
    first, second = summary["models"].values()
    assert summary["difference_of"] == "zimage - pai-diffusion-general-large-zh"
    for metrics in (first, second):  # each family's own validation loss (SD's epsilon, the DiT's flow matching)
        assert metrics["rows"] == 8 and math.isfinite(metrics["val_loss"]) and metrics["accuracy"]["all"]["n"] == 8
    assert first["val_loss"] != second["val_loss"]
    rows = read_scores(tmp_path / "out")
    assert [r["seed"] for r in rows[:8]] == [r["seed"] for r in rows[8:]]
    assert all(Image.open(tmp_path / "out" / r["image"]).size == (32, 32) for r in rows)
