"""pipeline.py and ``from easynlp_ldm import pipeline``: the Python API gives predict's images, one record per image."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from easynlp_ldm import cli, pipeline
from easynlp_ldm.errors import UserError
from tests.helpers import decode, predict_argv, read_rows


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def test_records_per_image_equal_predict_rows(tiny_model_dir, prompts_table, tmp_path):
    gen = pipeline("latent_diffusion", tiny_model_dir, pipeline_params={"n_samples": 2}, ddim_steps=3,
                   optimize="none", random_seed=7)
    prompts = [line.split("\t")[1] for line in open(prompts_table, encoding="utf-8").read().splitlines()[:2]]
    records = gen(prompts)
    assert [(r["idx"], r["text"], r["sample_id"]) for r in records] == [
        (0, prompts[0], 0), (0, prompts[0], 1), (1, prompts[1], 0), (1, prompts[1], 1)]
    out = str(tmp_path / "o.tsv")
    assert cli.main(predict_argv(prompts_table, out, tiny_model_dir, "--output_schema=text,seed,gen_imgbase64",
                                 udp="n_samples=2 ddim_steps=3 optimize=none")) == 0
    for record, (text, seed, cell) in zip(records, read_rows(out)):
        assert record["text"] == text and record["seed"] == int(seed)
        assert np.abs(pixels(record["image"]) - decode(cell)).max() <= 1
        assert pixels(Image.open(io.BytesIO(base64.b64decode(record["image_base64"])))).tolist() == \
            pixels(record["image"]).tolist()


def test_initial_latents_as_diffusers_takes_them(tiny_model_dir):
    gen = pipeline("latent_diffusion", tiny_model_dir, n_samples=1, ddim_steps=3, optimize="none")
    first = gen("红色的圆形")[0]
    own = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(first["seed"]))
    assert np.abs(pixels(gen("红色的圆形", latents=own)[0]["image"]) - pixels(first["image"])).max() == 0
    assert np.abs(pixels(gen("红色的圆形", latents=own * 0.5)[0]["image"]) - pixels(first["image"])).max() > 3
    with pytest.raises(UserError, match="latents: 2 given for 1 images"):
        gen("红色的圆形", latents=torch.zeros(2, 4, 16, 16))


def test_parameters_are_validated_like_the_command_line(tiny_model_dir):
    with pytest.raises(UserError, match="pipeline\\(\\): unknown key 'n_sample' \\(did you mean n_samples\\?\\)"):
        pipeline("latent_diffusion", tiny_model_dir, n_sample=1)
    with pytest.raises(UserError, match="pipeline\\(\\): ddim_steps='many' is not a valid int"):
        pipeline("latent_diffusion", tiny_model_dir, ddim_steps="many")
    with pytest.raises(UserError, match="pipeline\\(\\): n_samples=1.5 is not a valid int"):
        pipeline("latent_diffusion", tiny_model_dir, n_samples=1.5)
    with pytest.raises(UserError, match="not an app of this toolkit"):
        pipeline("chinese-ldm-general")
