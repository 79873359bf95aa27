"""Regression guard for the embedded DiT model shapes-dit-zh (issue 33): it loads by name and follows every attribute
a prompt states — colour, shape, background, size and position — judged from pixels, for prompts worded unlike any
of the data set's templates."""

import pytest

from appzoo.latent_diffusion.generation import Generator
from appzoo.latent_diffusion.loading import load_model
from appzoo.latent_diffusion.params import default_params
from appzoo.latent_diffusion.settings import GenerationSettings
from modelzoo.pretrained import embedded_models
from shapes_data import judge
from shapes_data.scoring import judge_prompt

NAME = "shapes-dit-zh"
# (prompt, what it states); none of these wordings is a template's.
PROMPTS = [
    ("请画一个红色的圆形，放在左上角", {"colour": "红色", "shape": "圆形", "position": "左上"}),
    ("我想要一张图：右下角有个蓝色正方形", {"colour": "蓝色", "shape": "正方形", "position": "右下"}),
    ("黄色三角形，位置在顶部，背景黑色", {"colour": "黄色", "shape": "三角形", "position": "上方",
                                   "background": "黑色"}),
    ("画一个小小的绿色圆形，靠左侧", {"colour": "绿色", "shape": "圆形", "size": "小", "position": "左边"}),
    ("紫色的正方形要大大的，在正中间", {"colour": "紫色", "shape": "正方形", "size": "大", "position": "中间"}),
    ("底部放一个橙色的三角形，灰色背景", {"colour": "橙色", "shape": "三角形", "position": "下方",
                                   "background": "灰色"}),
    ("右上角：一个红色正方形", {"colour": "红色", "shape": "正方形", "position": "右上"}),
    ("在左下角画个蓝色三角形吧", {"colour": "蓝色", "shape": "三角形", "position": "左下"}),
    ("右侧有一个大的黄色圆形，背景是白色", {"colour": "黄色", "shape": "圆形", "size": "大", "position": "右边",
                                    "background": "白色"}),
    ("绿色正方形，小的，放在上方", {"colour": "绿色", "shape": "正方形", "size": "小", "position": "上方"}),
]
# Measured 10 of 10 on every attribute at release with the folder's defaults (10 steps, guidance 2; seeds 3000… and
# 4000… alike); shapes-ldm-zh gets position right by chance only (about 1 in 9), so it would fail the position floor.
FLOORS = {"colour": 9, "shape": 9, "background": 3, "size": 3, "position": 8, "all_stated": 8}


@pytest.fixture(scope="module")
def verdicts():
    assert NAME in embedded_models(), f"{NAME} is missing from modelzoo/pretrained"
    model = load_model(NAME, optimize="auto")
    settings = GenerationSettings.from_params(default_params()).for_model(model)  # the folder's own defaults
    assert (settings.steps, settings.guidance_scale) == (10, 2.0)
    images = Generator(model, settings)([p for p, _ in PROMPTS], [3000 + i for i in range(len(PROMPTS))])
    return [judge_prompt(judge(image), stated) for image, (_, stated) in zip(images, PROMPTS)]


@pytest.mark.parametrize("attribute", sorted(FLOORS))
def test_follows_novel_wordings_above_the_floor(verdicts, attribute):
    judged = [v[attribute] for v in verdicts if v.get(attribute) is not None]
    assert sum(judged) >= FLOORS[attribute], (attribute, sum(judged), len(judged), verdicts)


def test_evaluate_judges_it_on_every_stated_attribute(tmp_path):
    """``--mode=evaluate`` judges the DiT as it judges the UNet model: every attribute the captions state, position
    included, from the folder's defaults (40 test prompts; 100 % on every attribute at release)."""
    import json

    from easynlp_ldm import cli
    from shapes_data import generate_dataset

    generate_dataset(str(tmp_path), seed=0, num_train=0, num_val=0, num_test=40, num_heldout=0)
    out = tmp_path / "metrics.json"
    assert cli.main(["--mode=evaluate", f"--tables={tmp_path / 'T2I_test.tsv'}", "--input_schema=idx:str:1,text:str:1",
                     f"--checkpoint_dir={NAME}", "--micro_batch_size=20", f"--outputs={out}"]) == 0
    accuracy = json.loads(out.read_text(encoding="utf-8"))["accuracy"]["all"]
    floors = {"colour": 0.9, "shape": 0.9, "background": 0.9, "size": 0.8, "position": 0.8, "all_stated": 0.8}
    for attribute, floor in floors.items():
        assert accuracy[f"{attribute}_n"] > 0 and accuracy[f"{attribute}_acc"] >= floor, (attribute, accuracy)
