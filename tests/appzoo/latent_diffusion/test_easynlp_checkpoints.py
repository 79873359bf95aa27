"""EasyNLP's own latent_diffusion checkpoints through the app: predict, evaluate, serve and fine-tune run on one, a
fine-tuned one is saved in EasyNLP's format, and export_format=easynlp writes one (lossless round trip)."""

import json
import os

import httpx
import numpy as np
import pytest
import torch

from easynlp_ldm import cli
from modelzoo.families import sd
from tests.helpers import (
    EASYNLP_DATA,
    InProcessServer,
    decode,
    easynlp_checkpoint,
    png,
    predict_argv,
    read_rows,
    train_argv,
)


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "prompts.tsv"
    path.write_text("1\t一只红色的圆\n2\tblue square\n", encoding="utf-8")
    return str(path)


def test_predict_and_evaluate(tmp_path, table, shapes_data):
    out = str(tmp_path / "out.tsv")
    assert cli.main(predict_argv(table, out, EASYNLP_DATA, udp="ddim_steps=3")) == 0
    rows = read_rows(out)
    assert len(rows) == 8 and decode(rows[0][-1]).shape == (32, 32, 3)  # 2 prompts × n_samples 4; 16 latents × 2
    metrics = str(tmp_path / "metrics.json")
    assert cli.main(["--mode=evaluate", f"--tables={os.path.join(shapes_data, 'T2I_val.tsv')}",
                     f"--checkpoint_dir={EASYNLP_DATA}", f"--outputs={metrics}"]) == 0
    loss = json.load(open(metrics))
    assert any("loss" in key and value > 0 for key, value in loss.items() if isinstance(value, float))


def test_default_sampling_is_easynlp_predictors():
    """GenerationSettings' defaults on an EasyNLP model (its PLMS, 20 steps, scale 5, native size, EMA weights)
    reproduce EasyNLP's predictor's sampling from the same initial noise (reference made by its PLMSSampler)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from appzoo.latent_diffusion.generation import generate
    from appzoo.latent_diffusion.settings import GenerationSettings

    path = os.path.join(EASYNLP_DATA, "reference.safetensors")
    ref = load_file(path)
    with safe_open(path, "pt") as handle:
        prompts = json.loads(handle.metadata()["prompts"])[:2]
    model = sd.load(EASYNLP_DATA)
    settings = GenerationSettings().for_model(model)
    assert (settings.steps, settings.guidance_scale, settings.height, model.scheduler_class) == (20, 5.0, 32,
                                                                                                 "PNDMScheduler")
    images = generate(model, prompts, [0, 1], settings, latents=ref["plms_x_t"])
    ours = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
                        for image in images])
    assert float((ours - ref["plms_images"]).abs().max()) <= 0.5 / 255 + 1e-4  # PNG rounding only


def test_serve():
    server = InProcessServer(EASYNLP_DATA)
    try:
        response = httpx.post(server.url + "/", json={"text": "红色的圆", "num_inference_steps": 2}, timeout=120)
        assert response.status_code == 200
        assert png(response.json()["images_base64"][0]).size == (32, 32)
    finally:
        server.stop()


def test_fine_tune_saves_easynlp_format(shapes_data, tmp_path):
    model = easynlp_checkpoint(tmp_path / "model", prefixed=True)
    out = str(tmp_path / "run")
    assert cli.main(train_argv(shapes_data, out, model, "--micro_batch_size=8", "--epoch_num=1",
                               "--learning_rate=1e-3", "--warmup_proportion=0")) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config == json.load(open(os.path.join(EASYNLP_DATA, "config.json")))
    state = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
    before = torch.load(os.path.join(EASYNLP_DATA, "pytorch_model.bin"), weights_only=True)
    assert set(state) == set(before)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert not torch.equal(state[key], before[key])
    assert torch.equal(state["model_ema." + key[len("model."):].replace(".", "")], state[key])
    assert torch.equal(state["first_stage_model.decoder.conv_out.weight"],
                       before["first_stage_model.decoder.conv_out.weight"])  # the VAE is frozen, as in EasyNLP


def test_export_easynlp_round_trip_and_refusal(tmp_path, tiny_model_dir, table, capsys):
    from modelzoo.esrgan import RRDBNet

    model = easynlp_checkpoint(tmp_path / "model", prefixed=True)
    esrgan = os.path.join(model, "RRDB_ESRGAN_x4.pth")
    torch.save(RRDBNet(nf=8, nb=1, gc=4).state_dict(), esrgan)
    out = str(tmp_path / "exported")
    assert cli.main(["--mode=export", f"--checkpoint_dir={model}", f"--outputs={out}",
                     "--user_defined_parameters=export_format=easynlp"]) == 0
    assert sorted(os.listdir(out)) == ["RRDB_ESRGAN_x4.pth", "config.json", "pytorch_model.bin", "vocab.txt"]
    assert open(os.path.join(out, "RRDB_ESRGAN_x4.pth"), "rb").read() == open(esrgan, "rb").read()
    predicted = str(tmp_path / "sr.tsv")
    assert cli.main(predict_argv(table, predicted, out, udp="ddim_steps=2 n_samples=1 do_sr=True")) == 0
    assert decode(read_rows(predicted)[0][-1]).shape == (128, 128, 3)  # ESRGAN ×4 (fed BGR, as EasyNLP did)
    written = torch.load(os.path.join(out, "pytorch_model.bin"), weights_only=True)
    source = torch.load(os.path.join(EASYNLP_DATA, "pytorch_model.bin"), weights_only=True)
    assert list(written) == list(source) and all(torch.equal(written[k], source[k]) for k in source)
    bad = str(tmp_path / "bad")
    assert cli.main(["--mode=export", f"--checkpoint_dir={tiny_model_dir}", f"--outputs={bad}",
                     "--user_defined_parameters=export_format=easynlp"]) == 2
    assert "Wukong text transformer" in capsys.readouterr().err and not os.path.exists(bad)
