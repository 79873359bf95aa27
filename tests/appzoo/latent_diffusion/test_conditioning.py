"""Generation from images: img2img, inpainting (4- and 9-channel UNets) and ControlNet, each against diffusers' own
pipeline on the same weights, seeds and settings (≤ 3/255); conditioning images' errors; Canny edges."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from appzoo.latent_diffusion.conditioning import ImageInputs, canny, parse_controlnets
from appzoo.latent_diffusion.generation import GenerationSettings, Generator
from easynlp_ldm.errors import UserError
from modelzoo.ldm import LatentDiffusion
from tests.helpers import PROMPTS

SEEDS = [11, 2024]


def photo(seed, size=(32, 32)):
    rng = np.random.default_rng(seed)
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:] = rng.integers(0, 255, 3)
    image = Image.fromarray(array)
    ImageDraw.Draw(image).ellipse((6, 6, 24, 20), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image


def mask(size=(32, 32)):
    image = Image.new("L", size, 0)
    ImageDraw.Draw(image).rectangle((8, 8, 24, 24), fill=255)  # white = repaint
    return image


def reference(cls_name, folder, **components):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                        **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(folder, inputs, **settings):
    model = LatentDiffusion.from_pretrained(folder)
    generate = Generator(model, GenerationSettings(steps=5, **settings))
    return [np.asarray(image, dtype=np.int16) for image in generate(PROMPTS[:2], SEEDS, inputs=inputs)]


def theirs(pipe, **kwargs):
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in SEEDS]
    images = pipe(PROMPTS[:2], num_inference_steps=5, guidance_scale=5.0, generator=generators, **kwargs).images
    return [np.asarray(image, dtype=np.int16) for image in images]


def assert_close(a, b):
    for x, y in zip(a, b):
        assert np.abs(x - y).max() <= 3, np.abs(x - y).max()


@pytest.fixture(scope="module")
def inpainting_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 9-channel inpainting UNet (latents, mask, masked-image latents), as SD's inpainting
    checkpoints have."""
    from diffusers import UNet2DConditionModel

    folder = str(tmp_path_factory.mktemp("inpaint") / "model")
    shutil.copytree(tiny_model_dir, folder)
    config = dict(UNet2DConditionModel.load_config(os.path.join(folder, "unet")))
    config["in_channels"] = 9
    torch.manual_seed(1)
    UNet2DConditionModel.from_config(config).save_pretrained(os.path.join(folder, "unet"), safe_serialization=False)
    return folder


@pytest.fixture(scope="module")
def controlnet_dir(tiny_model_dir, tmp_path_factory):
    """A ControlNet initialised from the tiny UNet (as diffusers' train_controlnet.py does), its zero convolutions
    given random weights so that it changes the images."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(tiny_model_dir, "unet"))
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "zero_conv" in name or "mid_block" in name or "conv_out" in name:
                param.copy_(torch.randn_like(param) * 0.5)
    folder = str(tmp_path_factory.mktemp("controlnet") / "canny")
    net.save_pretrained(folder)
    return folder


def test_img2img_matches_diffusers(tiny_model_dir):
    images = [photo(1), photo(2)]
    mine = ours(tiny_model_dir, ImageInputs(images=images), strength=0.6)
    assert_close(mine, theirs(reference("StableDiffusionImg2ImgPipeline", tiny_model_dir), image=images,
                              strength=0.6))
    plain = ours(tiny_model_dir, None)
    assert np.abs(mine[0] - plain[0]).max() > 10  # the input image mattered


def test_inpainting_with_a_text_to_image_unet_matches_diffusers_and_keeps_the_unmasked_part(tiny_model_dir):
    images, masks = [photo(3), photo(4)], [mask(), mask()]
    mine = ours(tiny_model_dir, ImageInputs(images=images, masks=masks))
    assert_close(mine, theirs(reference("StableDiffusionInpaintPipeline", tiny_model_dir), image=images,
                              mask_image=masks, height=32, width=32))


def test_inpainting_with_a_9_channel_unet_matches_diffusers(inpainting_model_dir):
    images, masks = [photo(5), photo(6)], [mask(), mask()]
    mine = ours(inpainting_model_dir, ImageInputs(images=images, masks=masks), strength=0.9)
    assert_close(mine, theirs(reference("StableDiffusionInpaintPipeline", inpainting_model_dir), image=images,
                              mask_image=masks, height=32, width=32, strength=0.9))


def test_controlnet_matches_diffusers_and_changes_the_image(tiny_model_dir, controlnet_dir):
    from diffusers import ControlNetModel

    controls = [photo(7), photo(8)]
    mine = ours(tiny_model_dir, ImageInputs(controls=[controls]), controlnets=((controlnet_dir, 0.8),))
    pipe = reference("StableDiffusionControlNetPipeline", tiny_model_dir,
                     controlnet=ControlNetModel.from_pretrained(controlnet_dir))
    # text-to-image draws each image's noise from its seed; diffusers' pipeline takes the same noise as latents
    latents = torch.cat([torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    assert_close(mine, theirs(pipe, image=controls, controlnet_conditioning_scale=0.8, height=32, width=32,
                              latents=latents))
    plain = ours(tiny_model_dir, None)
    assert np.abs(mine[0] - plain[0]).max() > 10
    # img2img with a ControlNet, and two ControlNets with their own scales
    images = [photo(9), photo(10)]
    mine = ours(tiny_model_dir, ImageInputs(images=images, controls=[controls]), strength=0.7,
                controlnets=((controlnet_dir, 0.5),))
    pipe = reference("StableDiffusionControlNetImg2ImgPipeline", tiny_model_dir,
                     controlnet=ControlNetModel.from_pretrained(controlnet_dir))
    assert_close(mine, theirs(pipe, image=images, control_image=controls, strength=0.7,
                              controlnet_conditioning_scale=0.5, height=32, width=32))
    two = ours(tiny_model_dir, ImageInputs(controls=[controls, controls[::-1]]),
               controlnets=((controlnet_dir, 0.8), (controlnet_dir, 0.3)))
    assert len(two) == 2


def test_canny_finds_the_edges_of_a_shape():
    image = Image.new("RGB", (64, 64), (40, 40, 40))
    ImageDraw.Draw(image).rectangle((16, 16, 47, 47), fill=(220, 220, 220))
    edges = np.asarray(canny(image))[..., 0] > 0
    assert edges[16:48, 14:19].any(axis=1).all() and edges[16:48, 45:50].any(axis=1).all()  # left and right sides
    assert not edges[24:40, 24:40].any() and not edges[:8].any()  # not inside, not in the flat background


def test_controlnet_specs_and_bad_conditioning_inputs(tiny_model_dir, controlnet_dir, tmp_path):
    assert parse_controlnets("a/b:0.5, c") == (("a/b", 0.5), ("c", 1.0))
    with pytest.raises(UserError, match="not a ControlNet folder"):
        ours(tiny_model_dir, None, controlnets=((str(tmp_path), 1.0),))
    with pytest.raises(UserError, match="no ControlNet"):
        ours(tiny_model_dir, ImageInputs(controls=[[photo(1), photo(2)]]))
    with pytest.raises(UserError, match="needs the image it applies to"):
        ours(tiny_model_dir, ImageInputs(masks=[mask(), mask()]))
