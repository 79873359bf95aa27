"""Issue 30 §6: a sampling setting that cannot apply to the chosen sampler is an error, not silently ignored.
``ddim_eta`` is DDIM's (diffusers passes eta only to a scheduler whose step takes it; EasyNLP's PLMS sampler
refused a non-zero eta): with PLMS, the model's own PLMS scheduler or any other sampler it fails in predict, evaluate,
the Python pipeline, at serve's start and as a 400 for a request choosing such a sampler."""

import os

import httpx
import numpy as np
import pytest

from easynlp_ldm import cli, pipeline
from easynlp_ldm.errors import UserError
from modelzoo.families import sd
from tests.helpers import EASYNLP_DATA, InProcessServer, png, predict_argv

ADVICE = "DDIM's eta applies only to sampler=ddim; set sampler=ddim or leave ddim_eta at 0"


@pytest.mark.parametrize("model,udp,named", [
    ("tiny", "sampler=plms ddim_eta=0.5", "sampler plms"),
    ("tiny", "sampler=euler ddim_eta=0.3", "sampler euler"),
    ("easynlp", "ddim_eta=0.5", "the model's own scheduler (PNDMScheduler)"),  # EasyNLP's own PLMS
])
def test_predict_refuses_ddim_eta_with_a_sampler_that_ignores_it(tiny_model_dir, prompts_table, tmp_path, capsys,
                                                                 model, udp, named):
    out = str(tmp_path / "o.tsv")
    folder = tiny_model_dir if model == "tiny" else EASYNLP_DATA
    assert cli.main(predict_argv(prompts_table, out, folder, udp=f"ddim_steps=2 {udp}")) == 2
    eta = udp.split("ddim_eta=")[1]
    assert f"ddim_eta={eta} cannot apply to {named}: {ADVICE}" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_ddim_eta_applies_with_ddim(tiny_model_dir):
    from appzoo.latent_diffusion.generation import Generator
    from appzoo.latent_diffusion.settings import GenerationSettings

    model = sd.load(tiny_model_dir)
    eta0, eta1 = (np.asarray(Generator(model, GenerationSettings(steps=3, sampler="ddim", eta=eta))(["红色"], [3])[0],
                             dtype=np.int16) for eta in (0.0, 1.0))
    assert np.abs(eta0 - eta1).max() > 0


def test_evaluate_refuses_it_before_the_denoising_loss(tiny_model_dir, shapes_data, capsys):
    table = os.path.join(shapes_data, "T2I_test.tsv")
    assert cli.main(["--mode=evaluate", f"--tables={table}", "--input_schema=idx:str:1,text:str:1,imgbase64:str:1",
                     f"--checkpoint_dir={tiny_model_dir}",
                     "--user_defined_parameters=ddim_steps=2 sampler=plms ddim_eta=0.5"]) == 2
    captured = capsys.readouterr()
    assert f"ddim_eta=0.5 cannot apply to sampler plms: {ADVICE}" in captured.err and "val_loss" not in captured.out


def test_pipeline_refuses_it_at_creation_and_reset(tiny_model_dir):
    with pytest.raises(UserError, match="ddim_eta=0.5 cannot apply to sampler plms"):
        pipeline("latent_diffusion", tiny_model_dir, sampler="plms", ddim_eta=0.5, optimize="none")
    gen = pipeline("latent_diffusion", tiny_model_dir, sampler="ddim", ddim_eta=0.5, optimize="none")
    with pytest.raises(UserError, match="ddim_eta=0.5 cannot apply to sampler euler"):
        gen.reset(sampler="euler")


def test_serve_refuses_it_at_start_and_answers_400_to_a_request_choosing_such_a_sampler(tiny_model_dir):
    from appzoo.latent_diffusion.loading import load_model
    from appzoo.latent_diffusion.params import default_params
    from appzoo.latent_diffusion.serve import LatentDiffusionService
    from appzoo.latent_diffusion.settings import InferenceSettings

    model = load_model(tiny_model_dir)
    with pytest.raises(UserError, match=r"ddim_eta=0.5 cannot apply to the model's own scheduler "
                                        r"\(DPMSolverMultistepScheduler\)"):
        LatentDiffusionService(model, InferenceSettings.from_params(default_params(ddim_eta=0.5)))
    server = InProcessServer(tiny_model_dir, model=model, sampler="ddim", ddim_eta=0.5)
    try:
        refused = httpx.post(server.url + "/", json={"text": "红色", "sampler": "plms"}, timeout=30)
        assert refused.status_code == 400 and refused.json()["field"] == "sampler"
        assert refused.json()["error"].startswith(f"sampler='plms': this service's ddim_eta=0.5 cannot apply to "
                                                  f"sampler plms: {ADVICE}")
        served = httpx.post(server.url + "/", json={"text": "红色", "sampler": "ddim", "num_inference_steps": 2},
                            timeout=60)
        assert served.status_code == 200 and png(served.json()["images_base64"][0])
    finally:
        server.stop()


@pytest.mark.parametrize("udp, note", [
    ("scale=1 negative_prompt=模糊", "negative_prompt='模糊' has no effect with scale=1: classifier-free guidance runs "
                                   "only with scale > 1"),
    ("scale=1 guidance_rescale=0.7", "guidance_rescale=0.7 has no effect with scale=1"),
    ("sr_tile=64", "sr_tile=64 has no effect without do_sr=True"),
    ("control_preprocessor=canny", "control_preprocessor=canny has no effect without controlnet="),
    ("strength=0.5", "strength=0.5 has no effect without input images"),
])
def test_a_setting_that_cannot_apply_is_a_note_not_silently_ignored(tiny_model_dir, prompts_table, tmp_path, caplog,
                                                                     udp, note):
    caplog.set_level("WARNING", logger="easynlp")
    assert cli.main(predict_argv(prompts_table, str(tmp_path / "o.tsv"), tiny_model_dir,
                                 udp=f"{udp} n_samples=1 ddim_steps=1 optimize=none")) == 0
    assert note in caplog.text
    caplog.clear()
    pipeline("latent_diffusion", tiny_model_dir, n_samples=1, ddim_steps=1, optimize="none", scale=5)
    assert "has no effect" not in caplog.text  # the defaults draw no note


def test_settings_filled_in_for_the_model_draw_no_note(tiny_model_dir, caplog):
    """Serve fills in the model's size and ESRGAN channel order, then builds generators from those settings: the
    filled-in values are not the user's and draw no note."""
    from appzoo.latent_diffusion.generation import Generator
    from appzoo.latent_diffusion.loading import load_model
    from appzoo.latent_diffusion.params import PARAMS
    from appzoo.latent_diffusion.settings import GenerationSettings
    from easynlp_ldm.args import validate_parameters

    model = load_model(tiny_model_dir, optimize="none")
    params, _ = validate_parameters([], PARAMS, "serve")
    caplog.set_level("WARNING", logger="easynlp")
    Generator(model, GenerationSettings.from_params(params).for_model(model))
    assert "has no effect" not in caplog.text
