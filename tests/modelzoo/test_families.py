"""The model-family seam (modelzoo/families): folders go to the family that recognises them, and the modes run a
second family — the test suite's flow-matching "toy-flow" (tests/modelzoo/toy_family.py), registered in
tests/conftest.py — through its own loader, pipeline, objective and checkpoint format, with no change to the app."""

import os

import numpy as np
import pytest
import torch

from easynlp_ldm import cli
from modelzoo import families
from tests.helpers import cell_pixels, png, predict_argv, read_rows, train_argv
from tests.modelzoo import toy_family

PROMPTS = ["红色的圆形", "蓝色的正方形在左边"]
UDP = "ddim_steps=3 scale=1.0 n_samples=1 optimize=none"  # fp32, no guidance: what the hand-run pipeline does


@pytest.fixture(scope="module")
def toy_model_dir(tmp_path_factory):
    return toy_family.make_toy_flow_model(str(tmp_path_factory.mktemp("toy") / "toy-flow"))


def test_folders_go_to_the_family_that_recognises_them(tiny_model_dir, toy_model_dir, tmp_path):
    assert families.family_for_folder(tiny_model_dir).name == "sd"
    assert families.family_for_folder(toy_model_dir).name == "toy-flow"
    assert families.load(toy_model_dir).family == "toy-flow"
    with pytest.raises(families.UnknownModelFolder, match=str(tmp_path)):
        families.family_for_folder(str(tmp_path))


def _direct_images(model_dir, seeds, steps):
    """What the toy family's pipeline makes of the prompts, called by hand as diffusers' users call a pipeline."""
    from appzoo.latent_diffusion.generation import image_seed

    model = families.load(model_dir)
    pipe = toy_family.ToyFlowPipeline(model.vae, model.text_encoder, model.tokenizer, model.unet,
                                      toy_family.FAMILY.scheduler(model))
    shape = (1, 4, model.image_size // model.vae_scale_factor, model.image_size // model.vae_scale_factor)
    latents = torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(7, line, 0)))
                         for line in seeds])
    images = pipe(prompt_embeds=model.encode_prompts(PROMPTS), num_inference_steps=steps, latents=latents).images
    return [(image * 255).round().astype(np.uint8) for image in images]


def test_predict_runs_through_the_second_family(toy_model_dir, tmp_path):
    table, out = tmp_path / "prompts.tsv", tmp_path / "out.tsv"
    table.write_text("".join(f"{i}\t{p}\n" for i, p in enumerate(PROMPTS)), encoding="utf-8")
    assert cli.main(predict_argv(table, out, toy_model_dir, udp=UDP)) == 0
    images = [np.asarray(png(row[-1]).convert("RGB")) for row in read_rows(out)]
    expected = _direct_images(toy_model_dir, [1, 2], 3)
    assert len(images) == 2
    for got, want in zip(images, expected):
        np.testing.assert_array_equal(got, want)


def test_train_runs_the_second_familys_objective_and_saves_in_its_format(toy_model_dir, shapes_data, tmp_path):
    out = str(tmp_path / "run")
    calls = toy_family.FlowMatchingObjective.calls
    argv = train_argv(shapes_data, out, toy_model_dir, "--epoch_num=1", "--micro_batch_size=4",
                      udp="sample_images=0")
    assert cli.main(argv) == 0
    assert toy_family.FlowMatchingObjective.calls > calls  # the family's objective computed the losses
    trained = families.load(out)
    assert trained.family == "toy-flow"  # saved in the family's format, read back by the family
    start = families.load(toy_model_dir)
    changed = [name for name, value in trained.unet.state_dict().items()
               if not torch.equal(value, start.unet.state_dict()[name])]
    assert changed, "training changed no UNet weight"
    # The trained checkpoint predicts through the family's pipeline too.
    table, predictions = tmp_path / "p.tsv", tmp_path / "p_out.tsv"
    table.write_text("0\t红色的圆形\n", encoding="utf-8")
    assert cli.main(predict_argv(table, predictions, out, udp="ddim_steps=2 scale=1.0 n_samples=1")) == 0
    assert png(read_rows(predictions)[0][-1]).size == (32, 32)
    assert not os.path.exists(os.path.join(out, "model_index.json"))


def test_what_a_family_does_not_offer_is_a_one_line_error(toy_model_dir, shapes_data, tmp_path, capsys):
    argv = train_argv(shapes_data, str(tmp_path / "vae"), toy_model_dir, udp="train_target=vae")
    assert cli.main(argv) == 2
    assert "train_target=vae is not available for toy-flow models (they train unet, lora)" in capsys.readouterr().err
    export = ["--mode=export", f"--checkpoint_dir={toy_model_dir}", f"--outputs={tmp_path / 'exported'}",
              "--user_defined_parameters=export_format=diffusers"]
    assert cli.main(export) == 2
    assert "export_format=diffusers is not available for toy-flow models (they export as tar)" in \
        capsys.readouterr().err
    assert not os.path.exists(tmp_path / "exported")


def test_the_second_family_exports_as_a_package_that_serves_its_images(toy_model_dir, tmp_path):
    package = str(tmp_path / "toy.tar.gz")
    assert cli.main(["--mode=export", f"--checkpoint_dir={toy_model_dir}", f"--outputs={package}"]) == 0
    table = tmp_path / "prompts.tsv"
    table.write_text("".join(f"{i}\t{p}\n" for i, p in enumerate(PROMPTS)), encoding="utf-8")
    assert cli.main(predict_argv(table, tmp_path / "a.tsv", toy_model_dir, udp=UDP)) == 0
    assert cli.main(predict_argv(table, tmp_path / "b.tsv", package, udp=UDP)) == 0
    assert [cell_pixels(row[-1]) for row in read_rows(tmp_path / "a.tsv")] == \
        [cell_pixels(row[-1]) for row in read_rows(tmp_path / "b.tsv")]
