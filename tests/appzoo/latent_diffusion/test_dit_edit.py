"""Qwen-Image-Edit (issue 32): a folder whose model_index.json names ``QwenImageEditPipeline`` edits predict's input
image column by the instruction in its text column, equal to ``QwenImageEditPipeline`` (and, with a mask column,
``QwenImageEditInpaintPipeline``) called by hand with the same seeds (fp32, optimize=none, within 3/255); serve and
the Python API give predict's image; ``lora=`` applies; what an edit model cannot do is a one-line error. A folder
naming ``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509/2511) edits each row's image as
``QwenImageEditPlusPipeline(image=[image], prompt=...)`` called by hand, one prompt a call.

The hand-built pipelines take the processor as the family reads it (``load_processor``: transformers' own
``Qwen2VLProcessor`` cannot be built here, it needs torchvision). diffusers' edit pipelines scale the input image to
1024² pixels whatever its size (``calculate_dimensions``), about 40 s a call for the tiny model on two CPU cores: the
module scales it to 32² instead, for predict, serve and the hand-built pipelines alike."""

import json
import os
import shutil

import httpx
import numpy as np
import pytest
import torch

import easynlp_ldm
from appzoo.latent_diffusion.conditioning import ImageInputs
from appzoo.latent_diffusion.generation import Generator
from appzoo.latent_diffusion.settings import GenerationSettings
from easynlp_ldm import cli
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import encode_image_base64
from modelzoo import families
from modelzoo.qwen_vl_processor import load_processor
from modelzoo.tiny_dit import make_tiny_qwenimage_edit_model, make_tiny_qwenimage_edit_plus_model
from tests.helpers import (
    InProcessServer,
    decode,
    mask,
    photo,
    png,
    predict_argv,
    random_adapter,
    read_rows,
    swap_flow_sampler,
    train_argv,
)

PROMPTS = ["把圆形变成蓝色", "make the background red"]
STEPS = 2
TOLERANCE = 3  # of 255
GUIDANCE = dict(true_cfg_scale=3.0, negative_prompt="bad")
UDP = f"ddim_steps={STEPS} n_samples=1 optimize=none true_cfg_scale=3.0 negative_prompt=bad"
# kind → the table's image columns
KINDS = {"edit": ("imgbase64",), "inpaint": ("imgbase64", "mask")}


@pytest.fixture(scope="module", autouse=True)
def small_condition_images():
    from diffusers.pipelines.qwenimage import (
        pipeline_qwenimage_edit,
        pipeline_qwenimage_edit_inpaint,
        pipeline_qwenimage_edit_plus,
    )

    with pytest.MonkeyPatch.context() as patch:
        for module in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_inpaint, pipeline_qwenimage_edit_plus):
            dimensions = module.calculate_dimensions
            patch.setattr(module, "calculate_dimensions",
                          lambda area, ratio, dimensions=dimensions: dimensions(32 * 32, ratio))
        yield


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_qwenimage_edit_model(str(tmp_path_factory.mktemp("dit_edit") / "edit"))


def _images(line):
    return {"imgbase64": photo(40 + line), "mask": mask()}


def _predict(folder, root, kind, udp):
    """predict's rows (line, seed, image) for PROMPTS with ``kind``'s image columns."""
    columns = KINDS[kind]
    table, out = root / f"{kind}.tsv", root / f"{kind}_out.tsv"
    table.write_text("".join("\t".join([str(line), prompt] + [encode_image_base64(_images(line)[column])
                                                              for column in columns]) + "\n"
                             for line, prompt in enumerate(PROMPTS)), encoding="utf-8")
    argv = predict_argv(table, out, folder, "--output_schema=idx,seed,gen_imgbase64", udp=udp)
    argv[2] = "--input_schema=" + ",".join(["idx:str:1", "text:str:1"] + [f"{c}:str:1" for c in columns])
    assert cli.main(argv) == 0
    return [(int(idx), int(seed), decode(cell)) for idx, seed, cell in read_rows(out)]


@pytest.fixture(scope="module")
def predicted(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_edit_predict")
    return {kind: _predict(folder, root, kind, UDP) for kind in KINDS}


def _hand_pipeline(folder, kind):
    """``QwenImageEditPipeline`` from the folder (its processor read by ``load_processor``), or the inpainting one
    over its components."""
    import diffusers

    pipe = diffusers.QwenImageEditPipeline.from_pretrained(folder, local_files_only=True,
                                                           processor=load_processor(f"{folder}/processor"))
    if kind == "inpaint":
        pipe = diffusers.QwenImageEditInpaintPipeline(**pipe.components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _by_hand(pipe, kind, line, seed, steps=STEPS):
    images = _images(line)
    extra = dict(mask_image=images["mask"], strength=1.0) if kind == "inpaint" else {}
    image = pipe(image=images["imgbase64"], prompt=PROMPTS[line], height=32, width=32, num_inference_steps=steps,
                 output_type="np", generator=torch.Generator().manual_seed(seed), **GUIDANCE, **extra).images[0]
    return (image * 255).round().astype(np.int16)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_predict_edits_the_input_image_as_the_diffusers_pipeline_called_by_hand(folder, predicted, kind):
    assert families.family_for_folder(folder).name == "qwenimage-edit"
    pipe = _hand_pipeline(folder, kind)
    assert [line for line, _, _ in predicted[kind]] == [0, 1]
    for line, seed, image in predicted[kind]:
        expected = _by_hand(pipe, kind, line, seed)
        assert image.shape == expected.shape == (32, 32, 3)
        assert np.abs(image - expected).max() <= TOLERANCE, (kind, line)
    (_, _, first), (_, _, second) = predicted[kind]
    assert np.abs(first - second).max() > 10  # the instruction and the image matter


def test_python_api_and_serve_give_predicts_image_for_the_same_seed(folder, predicted):
    by_seed = {seed: image for _, seed, image in predicted["edit"]}
    api = easynlp_ldm.pipeline("latent_diffusion", folder, random_seed=7, ddim_steps=STEPS, n_samples=1,
                               optimize="none", **GUIDANCE)
    records = api(PROMPTS, images=[_images(line)["imgbase64"] for line in (0, 1)])
    assert sorted(r["seed"] for r in records) == sorted(by_seed)
    for record in records:
        assert np.abs(np.asarray(record["image"].convert("RGB"), dtype=np.int16) - by_seed[record["seed"]]).max() <= 1
    line, seed, image = predicted["edit"][1]
    server = InProcessServer(folder, optimize="none", **GUIDANCE)
    try:
        response = httpx.post(server.url + "/", json={
            "text": PROMPTS[line], "num_images": 1, "seed": seed, "num_inference_steps": STEPS,
            "image": encode_image_base64(_images(line)["imgbase64"])}, timeout=60)
        without_image = httpx.post(server.url + "/", json={"text": PROMPTS[line], "num_images": 1}, timeout=60)
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    served = np.asarray(png(response.json()["images_base64"][0]).convert("RGB"), dtype=np.int16)
    assert np.abs(served - image).max() <= 1
    assert without_image.status_code == 400 and "image is required" in without_image.text


def test_lora_applies_to_the_edit_transformer(folder, predicted, tmp_path):
    adapter = random_adapter(families.load(folder), str(tmp_path / "adapter"), ["to_q", "to_k", "to_v", "to_out.0"],
                             seed=3, scale=0.5)
    adapted = _predict(folder, tmp_path, "edit", f"{UDP} lora={adapter}")
    pipe = _hand_pipeline(folder, "edit")
    pipe.load_lora_weights(adapter)
    line, seed, image = adapted[0]
    assert np.abs(image - _by_hand(pipe, "edit", line, seed)).max() <= TOLERANCE
    assert np.abs(image - predicted["edit"][0][2]).max() > 10  # the adapter moved pixels


def test_one_step_edits_run_the_edit_pipeline_taking_no_strength_is_not_checked_for_one(folder, tmp_path):
    """img2img's strength (0.8) × 1 step would redraw no step; the edit pipeline takes no strength, so it is not
    asked to (predict, before and after the model loads, and the Python API)."""
    lightning = str(tmp_path / "lightning")  # one step needs a schedule without shift_terminal (its 0/0 is NaN)
    shutil.copytree(folder, lightning)
    path = os.path.join(lightning, "scheduler", "scheduler_config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(dict(config, shift_terminal=None), handle)
    rows = _predict(lightning, tmp_path, "edit", UDP.replace(f"ddim_steps={STEPS}", "ddim_steps=1"))
    pipe = _hand_pipeline(lightning, "edit")
    for line, seed, image in rows:
        assert np.abs(image - _by_hand(pipe, "edit", line, seed, steps=1)).max() <= TOLERANCE, line
    api = easynlp_ldm.pipeline("latent_diffusion", lightning, ddim_steps=1, n_samples=1, optimize="none", **GUIDANCE)
    assert len(api(PROMPTS[:1], images=[photo(40)])) == 1


def test_unipc_runs_the_edit_pipeline_which_starts_from_noise(folder, tmp_path):
    """The edit pipeline never noises its input image (no scale_noise): UniPC gives the image the pipeline gives with
    UniPC swapped in (called by hand with predict's batch of two: UniPC's higher order carries the batch's float
    noise further than euler's step); the edit inpainting pipeline noises it, so there it is a one-line error."""
    rows = _predict(folder, tmp_path, "edit", UDP.replace(f"ddim_steps={STEPS}", "ddim_steps=4") + " sampler=unipc")
    pipes = {sampler: swap_flow_sampler(_hand_pipeline(folder, "edit"), sampler) for sampler in ("unipc", "euler")}
    by_hand = {sampler: pipe(image=[_images(line)["imgbase64"] for line, _, _ in rows], prompt=PROMPTS, height=32,
                             width=32, num_inference_steps=4, output_type="np", true_cfg_scale=3.0,
                             negative_prompt=["bad"] * len(rows),
                             generator=[torch.Generator().manual_seed(seed) for _, seed, _ in rows]).images
               for sampler, pipe in pipes.items()}
    for (line, _, image), unipc, euler in zip(rows, by_hand["unipc"], by_hand["euler"]):
        assert np.abs(image - (unipc * 255).round()).max() <= TOLERANCE, line
        assert np.abs(image - (euler * 255).round()).max() > TOLERANCE, line  # UniPC ran, not the folder's euler
    with pytest.raises(UserError, match="qwenimage-edit models cannot run inpaint with UniPCMultistepScheduler "
                                        r"\(their inpaint pipeline, QwenImageEditInpaintPipeline, noises the image"):
        Generator(families.load(folder), GenerationSettings(steps=STEPS, sampler="unipc"))(
            PROMPTS[:1], [1], inputs=ImageInputs(images=[photo(40)], masks=[mask()]))


def test_a_saved_edit_model_loads_back_and_edits_alike(folder, tmp_path):
    model = families.load(folder)
    families.save(model, str(tmp_path / "saved"))
    again = families.load(str(tmp_path / "saved"))
    assert families.family_of(again).name == "qwenimage-edit"
    settings = GenerationSettings(steps=STEPS, **GUIDANCE)
    inputs = ImageInputs(images=[photo(40)])
    first, second = (np.asarray(Generator(m, settings)(PROMPTS[:1], [5], inputs=inputs)[0]) for m in (model, again))
    assert np.array_equal(first, second)


def test_what_an_edit_model_cannot_do_is_one_line(folder, tmp_path, capsys):
    model = families.load(folder)
    with pytest.raises(UserError, match="qwenimage-edit models edit an input image by the instruction"):
        Generator(model, GenerationSettings(steps=STEPS))(PROMPTS[:1], [1])
    with pytest.raises(UserError, match="strength=0.5: qwenimage-edit models take no strength"):
        Generator(model, GenerationSettings(steps=STEPS, strength=0.5))
    data = tmp_path / "data"
    data.mkdir()
    for name in ("T2I_train.tsv", "T2I_val.tsv"):
        (data / name).write_text(f"0\t{PROMPTS[0]}\t{encode_image_base64(photo(1))}\n", encoding="utf-8")
    assert cli.main(train_argv(str(data), str(tmp_path / "out"), folder, udp="train_target=lora")) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == ("easynlp: error: train_target=lora is not available for qwenimage-edit models (they cannot be "
                     "fine-tuned here)"), error


# ---------------------------------------------------------------------------------------------- Edit-Plus
@pytest.fixture(scope="module")
def plus_folder(tmp_path_factory):
    return make_tiny_qwenimage_edit_plus_model(str(tmp_path_factory.mktemp("dit_edit_plus") / "edit_plus"))


def _plus_by_hand(folder, line, seed):
    """``QwenImageEditPlusPipeline`` from the folder, called as its docs call it: the row's image as the list of
    reference pictures of its one prompt."""
    import diffusers

    pipe = diffusers.QwenImageEditPlusPipeline.from_pretrained(folder, local_files_only=True,
                                                               processor=load_processor(f"{folder}/processor"))
    pipe.set_progress_bar_config(disable=True)
    image = pipe(image=[_images(line)["imgbase64"]], prompt=PROMPTS[line], height=32, width=32,
                 num_inference_steps=STEPS, output_type="np", generator=torch.Generator().manual_seed(seed),
                 **GUIDANCE).images[0]
    return (image * 255).round().astype(np.int16)


def test_edit_plus_edits_each_rows_image_as_the_pipeline_called_by_hand_and_serve_gives_its_image(plus_folder,
                                                                                                    tmp_path):
    assert families.family_for_folder(plus_folder).name == "qwenimage-edit-plus"
    rows = _predict(plus_folder, tmp_path, "edit", UDP)  # a batch of 2 prompts, each with its own image
    assert [line for line, _, _ in rows] == [0, 1]
    for line, seed, image in rows:
        assert np.abs(image - _plus_by_hand(plus_folder, line, seed)).max() <= TOLERANCE, line
    (_, _, first), (_, _, second) = rows
    assert np.abs(first - second).max() > 10
    line, seed, image = rows[1]
    server = InProcessServer(plus_folder, optimize="none", **GUIDANCE)
    try:
        response = httpx.post(server.url + "/", json={
            "text": PROMPTS[line], "num_images": 1, "seed": seed, "num_inference_steps": STEPS,
            "image": encode_image_base64(_images(line)["imgbase64"])}, timeout=60)
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    served = np.asarray(png(response.json()["images_base64"][0]).convert("RGB"), dtype=np.int16)
    assert np.abs(served - image).max() <= 1
