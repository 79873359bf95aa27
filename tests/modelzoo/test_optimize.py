import numpy as np
import pytest
import torch

from appzoo.latent_diffusion.params import PARAMS
from appzoo.latent_diffusion.predict import Generator
from modelzoo.ldm import LatentDiffusion
from modelzoo.optimize import prepare_for_inference

PROMPTS = ["红色的圆形", "蓝色的正方形", "黄色的三角形", "绿色的圆形"]


def images(model_dir, level, steps=4):
    model = LatentDiffusion.from_pretrained(model_dir)
    done = prepare_for_inference(model, level)
    params = {p.name: p.default for p in PARAMS}
    params["ddim_steps"] = steps
    generate = Generator(model, params)
    out = [np.asarray(im, dtype=np.float64) for im in generate(PROMPTS, [1, 2, 3, 4])]
    return out, done, generate


def psnr(a, b):
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return images(tiny_model_dir, "none")[0]


def test_auto_is_close_to_none(tiny_model_dir, reference):
    out, done, _ = images(tiny_model_dir, "auto")
    assert done["dtype"] == ("bfloat16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "float32")
    assert min(psnr(a, b) for a, b in zip(out, reference)) >= 25  # stated tolerance: PSNR ≥ 25 dB per image


def test_max_is_close_to_none_and_does_not_recompile(tiny_model_dir, reference):
    out, done, generate = images(tiny_model_dir, "max")
    assert done["compiled"] == ["unet", "vae.decoder"]
    assert min(psnr(a, b) for a, b in zip(out, reference)) >= 25
    with torch._dynamo.config.patch(error_on_recompile=True):
        generate(PROMPTS, [5, 6, 7, 8])  # same shapes: no new compilation


def test_unknown_level_is_rejected(tiny_model_dir):
    with pytest.raises(ValueError, match="optimize must be one of"):
        prepare_for_inference(LatentDiffusion.from_pretrained(tiny_model_dir), "turbo")
