"""sampler= and the model folder's sampling defaults for Z-Image and Qwen-Image (issue 32, Build 2): each sampler the
families offer gives the diffusers pipeline's image with that scheduler swapped in; the others are a one-line error in
predict and a 400 in serve; a Z-Image-Turbo folder samples with its card's 9 unguided steps unless the user says
otherwise (CLI, Python API, serve request), and a folder trained from it keeps them."""

import json
import os
import shutil
import warnings

import diffusers
import httpx
import numpy as np
import pytest
import torch

import easynlp_ldm
from appzoo.latent_diffusion.generation import image_seed
from easynlp_ldm import cli
from modelzoo import families
from modelzoo.tiny_dit import make_tiny_qwenimage_model, make_tiny_zimage_model
from tests.helpers import (
    FLOW_SAMPLERS,
    InProcessServer,
    decode,
    png,
    predict_argv,
    read_rows,
    swap_flow_sampler,
    train_argv,
)

PROMPT = "一个红色的圆形"
SEED = 7  # predict_argv's --random_seed
TOLERANCE = 3  # of 255
MAKERS = {"zimage": make_tiny_zimage_model, "qwenimage": make_tiny_qwenimage_model}
ACCEPTED = [("zimage", "euler"), ("qwenimage", "euler"), ("qwenimage", "unipc")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    made = {name: make(str(root / name)) for name, make in MAKERS.items()}
    # a Z-Image-Turbo download as the Hugging Face cache holds it: known by its repository name
    made["turbo"] = str(root / "hub" / "models--Tongyi-MAI--Z-Image-Turbo" / "snapshots" / "0123abc")
    shutil.copytree(made["zimage"], made["turbo"])
    return made


@pytest.fixture
def prompts(tmp_path):
    table = tmp_path / "prompts.tsv"
    table.write_text(f"0\t{PROMPT}\n", encoding="utf-8")
    return table


def _predicted(table, out, folder, udp):
    """predict's one image of PROMPT (sample 0) and its seed."""
    argv = predict_argv(table, out, folder, "--output_schema=idx,text,gen_imgbase64,sample_id,seed", udp=udp)
    assert cli.main(argv) == 0
    [(_, _, image, sample, seed)] = read_rows(out)
    assert int(seed) == image_seed(SEED, 1, int(sample))
    return decode(image), int(seed)


def _pipeline(folder, sampler="euler"):
    """The folder's diffusers pipeline as a diffusers user loads it, with ``sampler``'s scheduler swapped in."""
    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return swap_flow_sampler(pipe, sampler)


def _expected(pipe, seed, **arguments):
    image = pipe(PROMPT, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(seed),
                 **arguments).images[0]
    return (image * 255).round().astype(np.int16)


def _close(image, expected, tolerance=TOLERANCE):
    assert image.shape == expected.shape == (32, 32, 3)
    assert np.abs(image - expected).max() <= tolerance


@pytest.mark.parametrize("name,sampler", ACCEPTED)
def test_each_sampler_gives_the_pipelines_image_with_its_scheduler(folders, prompts, tmp_path, name, sampler):
    image, seed = _predicted(prompts, tmp_path / "out.tsv", folders[name],
                             f"ddim_steps=3 scale=3 n_samples=1 optimize=none sampler={sampler}")
    _close(image, _expected(_pipeline(folders[name], sampler), seed, num_inference_steps=3, guidance_scale=3.0))
    model = families.load(folders[name])
    assert type(families.family_of(model).scheduler(model, sampler)).__name__ == FLOW_SAMPLERS[sampler][0]


def _one_line_error(capsys, argv, expected):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("easynlp: error:")]) == 1


@pytest.mark.parametrize("name,sampler,offered", [("zimage", "unipc", "euler"), ("zimage", "heun", "euler"),
                                                  ("qwenimage", "lcm", "euler, unipc"),
                                                  ("qwenimage", "dpm-solver++", "euler, unipc")])
def test_a_sampler_the_family_does_not_run_is_a_one_line_error(folders, prompts, tmp_path, capsys, name, sampler,
                                                               offered):
    _one_line_error(capsys, predict_argv(prompts, tmp_path / "out.tsv", folders[name],
                                         udp=f"ddim_steps=2 n_samples=1 sampler={sampler}"),
                    f"unknown sampler '{sampler}' for {name} models; choose one of {offered}")


def test_unipc_from_an_image_is_a_one_line_error(folders, shapes_data, tmp_path, capsys):
    """Qwen-Image's img2img pipeline noises the image with scale_noise, which UniPC lacks."""
    argv = predict_argv(os.path.join(shapes_data, "T2I_val.tsv"), tmp_path / "out.tsv", folders["qwenimage"],
                        udp="ddim_steps=2 n_samples=1 optimize=none sampler=unipc")
    argv[2] = "--input_schema=idx:str:1,text:str:1,imgbase64:str:1"
    _one_line_error(capsys, argv, "qwenimage models cannot run img2img with UniPCMultistepScheduler")


def test_serve_answers_400_to_a_sampler_the_family_does_not_run(folders):
    server = InProcessServer(folders["zimage"])
    try:
        refused = httpx.post(server.url + "/", json={"text": PROMPT, "sampler": "ddim"}, timeout=60)
        accepted = httpx.post(server.url + "/", json={"text": PROMPT, "sampler": "euler"}, timeout=60)
    finally:
        server.stop()
    assert refused.status_code == 400 and refused.json()["field"] == "sampler", refused.text
    assert "sampler must be one of euler" in refused.json()["error"]
    assert accepted.status_code == 200, accepted.text


def test_turbo_samples_with_its_cards_settings_unless_the_user_gives_others(folders, prompts, tmp_path, caplog):
    caplog.set_level("INFO")
    pipe = _pipeline(folders["turbo"])
    image, seed = _predicted(prompts, tmp_path / "default.tsv", folders["turbo"], "n_samples=1 optimize=none")
    assert "ddim_steps=9, scale=0 (from Tongyi-MAI/Z-Image-Turbo's model card" in caplog.text
    turbo = _expected(pipe, seed, num_inference_steps=9, guidance_scale=0.0)
    _close(image, turbo)
    assert np.abs(image - _expected(pipe, seed, num_inference_steps=20, guidance_scale=5.0)).max() > TOLERANCE
    [record] = easynlp_ldm.pipeline("latent_diffusion", folders["turbo"], random_seed=SEED, n_samples=1,
                                    optimize="none")([PROMPT])
    assert np.array_equal(np.asarray(record["image"].convert("RGB"), dtype=np.int16), image)
    given, _ = _predicted(prompts, tmp_path / "given.tsv", folders["turbo"],
                          "ddim_steps=2 scale=3 n_samples=1 optimize=none")
    _close(given, _expected(pipe, seed, num_inference_steps=2, guidance_scale=3.0))
    steps_only, _ = _predicted(prompts, tmp_path / "steps.tsv", folders["turbo"],
                               "ddim_steps=20 n_samples=1 optimize=none")  # the global default, given: kept
    _close(steps_only, _expected(pipe, seed, num_inference_steps=20, guidance_scale=0.0))
    # serve: the service's defaults are the folder's; a request's fields win
    server = InProcessServer(folders["turbo"], ddim_steps=None, optimize="none")
    try:
        default = httpx.post(server.url + "/", json={"text": PROMPT, "seed": seed}, timeout=60)
        chosen = httpx.post(server.url + "/", json={"text": PROMPT, "seed": seed, "num_inference_steps": 2,
                                                    "guidance_scale": 3.0}, timeout=60)
    finally:
        server.stop()
    for response, expected in ((default, turbo), (chosen, given)):
        assert response.status_code == 200, response.text
        served = np.asarray(png(response.json()["images_base64"][0]).convert("RGB"), dtype=np.int16)
        _close(served, expected, tolerance=1)


def test_a_folder_trained_from_turbo_keeps_its_defaults(folders, shapes_data, tmp_path):
    run = str(tmp_path / "run")
    assert cli.main(train_argv(shapes_data, run, folders["turbo"], "--micro_batch_size=8", "--epoch_num=1",
                               udp="train_target=transformer sample_images=0")) == 0
    with open(os.path.join(run, "model_index.json"), encoding="utf-8") as handle:
        assert json.load(handle)["_generation_defaults"] == {"num_inference_steps": 9, "guidance_scale": 0.0}
    model = families.load(run)
    defaults, source = families.family_of(model).generation_defaults(model)
    assert defaults == {"steps": 9, "guidance_scale": 0.0}
    assert source.startswith("_generation_defaults of ") and source.endswith("model_index.json")


def test_a_folder_without_known_defaults_keeps_the_global_ones(folders):
    for name in MAKERS:
        model = families.load(folders[name])
        assert families.family_of(model).generation_defaults(model) == ({}, "")


def test_bad_generation_defaults_in_a_folder_are_a_one_line_error(folders, prompts, tmp_path, capsys):
    folder = str(tmp_path / "bad")
    shutil.copytree(folders["zimage"], folder)
    path = os.path.join(folder, "model_index.json")
    with open(path, encoding="utf-8") as handle:
        index = json.load(handle)
    index["_generation_defaults"] = {"num_inference_steps": 0}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(index, handle)
    _one_line_error(capsys, predict_argv(prompts, tmp_path / "out.tsv", folder),
                    "_generation_defaults: num_inference_steps=0 must be a positive integer")


def test_loading_a_folder_in_a_dtype_warns_of_no_deprecation(folders):
    """DiTFamily.load names the dtype as diffusers' pipelines take it (dtype=; their torch_dtype= is deprecated and
    warns); every component, transformers' text encoder too, loads in it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in MAKERS:
            model = families.load(folders[name], dtype=torch.bfloat16)
            assert {part.dtype for part in (model.transformer, model.vae, model.text_encoder)} == {torch.bfloat16}
    deprecations = [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert not deprecations, deprecations
