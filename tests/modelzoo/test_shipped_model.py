"""Regression guard for the embedded default model: it loads by name and still follows a fixed set of prompts
(judged from pixels), including wordings the data set's templates never used."""

import dataclasses

import pytest

from appzoo.latent_diffusion.generation import GenerationSettings, Generator
from appzoo.latent_diffusion.loading import load_model
from modelzoo.pretrained import DEFAULT_MODEL, embedded_models
from shapes_data import judge

# (prompt, colour, shape); the last four are worded unlike any template.
PROMPTS = [
    ("白色背景上有一个红色的圆形", "红色", "圆形"), ("一个蓝色的正方形，背景是黑色", "蓝色", "正方形"),
    ("灰色背景上的黄色三角形", "黄色", "三角形"), ("一个绿色的圆形", "绿色", "圆形"),
    ("紫色的正方形", "紫色", "正方形"), ("橙色的三角形在白色背景的中间", "橙色", "三角形"),
    ("黑色背景上的红色正方形", "红色", "正方形"), ("一个蓝色的圆形", "蓝色", "圆形"),
    ("请画一个黄色的正方形", "黄色", "正方形"), ("我想要一张图：绿色三角形", "绿色", "三角形"),
    ("画一只橙色的圆形吧", "橙色", "圆形"), ("三角形，紫色的", "紫色", "三角形"),
]
FLOOR_COLOUR, FLOOR_SHAPE = 10, 9  # measured 12 and 11 of 12 at release (bench in the README)


@pytest.fixture(scope="module")
def model():
    assert DEFAULT_MODEL in embedded_models(), "the embedded default model is missing from modelzoo/pretrained"
    return load_model("", optimize="auto"), GenerationSettings()


def test_follows_prompts_above_the_floor(model):
    loaded, settings = model
    images = Generator(loaded, settings)([p for p, _, _ in PROMPTS], [1000 + i for i in range(len(PROMPTS))])
    verdicts = [judge(image) for image in images]
    colour = sum(v.colour == c for v, (_, c, _) in zip(verdicts, PROMPTS))
    shape = sum(v.shape == s for v, (_, _, s) in zip(verdicts, PROMPTS))
    assert colour >= FLOOR_COLOUR and shape >= FLOOR_SHAPE, (colour, shape, verdicts)


def test_super_resolution_gives_256(model):
    loaded, settings = model
    image = Generator(loaded, dataclasses.replace(settings, do_sr=True, steps=10))(["红色的圆形"], [1])[0]
    assert image.size == (256, 256)
