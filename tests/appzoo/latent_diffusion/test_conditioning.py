"""Generation from images: img2img, inpainting (4- and 9-channel UNets) and ControlNet, each against diffusers' own
pipeline on the same weights, seeds and settings (≤ 3/255); conditioning images' errors; Canny edges."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from appzoo.latent_diffusion.conditioning import ImageInputs, canny, parse_controlnets
from appzoo.latent_diffusion.generation import Generator
from appzoo.latent_diffusion.settings import GenerationSettings
from easynlp_ldm.errors import UserError
from modelzoo.families import sd
from tests.helpers import PROMPTS, make_test_controlnet, mask, photo

SEEDS = [11, 2024]






def reference(cls_name, folder, **components):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                        **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(folder, inputs, **settings):
    model = sd.load(folder)
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
    return make_test_controlnet(tiny_model_dir, str(tmp_path_factory.mktemp("controlnet") / "canny"))


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


def b64(image):
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_table(path, rows):
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write("\t".join(row) + "\n")
    return str(path)


def test_predict_inpaints_from_image_and_mask_columns_like_diffusers(tiny_model_dir, tmp_path):
    from easynlp_ldm import cli
    from tests.helpers import decode, predict_argv, read_rows

    images = [photo(20), photo(21)]
    table = write_table(tmp_path / "in.tsv", [(str(i), PROMPTS[i], b64(images[i]), b64(mask())) for i in range(2)])
    out = str(tmp_path / "out.tsv")
    argv = predict_argv(table, out, tiny_model_dir, "--output_schema=idx,seed,gen_imgbase64",
                        udp="n_samples=1 ddim_steps=5 strength=0.9 optimize=none")
    argv[2] = "--input_schema=idx:str:1,text:str:1,imgbase64:str:1,mask:str:1"
    assert cli.main(argv) == 0
    rows = read_rows(out)
    pipe = reference("StableDiffusionInpaintPipeline", tiny_model_dir)
    for (idx, seed, cell), image in zip(rows, images):
        expected = pipe(PROMPTS[int(idx)], image=image, mask_image=mask(), strength=0.9, num_inference_steps=5,
                        guidance_scale=5.0, height=32, width=32,
                        generator=torch.Generator("cpu").manual_seed(int(seed))).images[0]
        assert np.abs(decode(cell) - np.asarray(expected, dtype=np.int16)).max() <= 3


def test_predict_with_a_controlnet_column_and_canny(tiny_model_dir, controlnet_dir, tmp_path):
    from easynlp_ldm import cli
    from tests.helpers import decode, predict_argv, read_rows

    controls = [photo(30), photo(31)]
    table = write_table(tmp_path / "in.tsv", [(str(i), PROMPTS[i], b64(controls[i])) for i in range(2)])
    out = str(tmp_path / "out.tsv")
    argv = predict_argv(table, out, tiny_model_dir, "--output_schema=idx,seed,gen_imgbase64",
                        udp=f"n_samples=1 ddim_steps=5 controlnet={controlnet_dir}:0.7 control_preprocessor=canny "
                            f"optimize=none")
    argv[2] = "--input_schema=idx:str:1,text:str:1,control:str:1"
    assert cli.main(argv) == 0
    model = sd.load(tiny_model_dir)
    generate = Generator(model, GenerationSettings(steps=5, controlnets=((controlnet_dir, 0.7),)))
    for idx, seed, cell in read_rows(out):
        i = int(idx)
        expected = generate([PROMPTS[i]], [int(seed)], inputs=ImageInputs(controls=[[canny(controls[i])]]))[0]
        assert np.abs(decode(cell) - np.asarray(expected, dtype=np.int16)).max() <= 3
    # no conditioning column for the ControlNet: a clear error before any work
    argv[2] = "--input_schema=idx:str:1,text:str:1,imgbase64:str:1"
    assert cli.main(argv) == 2


def test_predict_names_the_row_of_a_bad_input_image_or_mask(tiny_model_dir, tmp_path, capsys):
    from easynlp_ldm import cli
    from tests.helpers import predict_argv, read_rows

    good = (b64(photo(1)), b64(mask()))
    table = write_table(tmp_path / "in.tsv", [("0", PROMPTS[0], *good), ("1", PROMPTS[1], b64(photo(2)),
                                                                         b64(mask((16, 16)))),
                                              ("2", PROMPTS[2], "bm90IGFuIGltYWdl", good[1])])
    out = str(tmp_path / "out.tsv")
    argv = predict_argv(table, out, tiny_model_dir, udp="n_samples=1 ddim_steps=2")
    argv[2] = "--input_schema=idx:str:1,text:str:1,imgbase64:str:1,mask:str:1"
    assert cli.main(argv) == 2
    assert f"{table}, line 2: mask size: the mask is 16×16 but its image 32×32" in capsys.readouterr().err
    argv[-1] += " skip_bad_rows=True"
    assert cli.main(argv) == 0
    assert len(read_rows(out)) == 1


def test_python_api_takes_pil_images_masks_and_conditioning_images(tiny_model_dir, controlnet_dir):
    from easynlp_ldm import pipeline

    images = [photo(40), photo(41)]
    gen = pipeline("latent_diffusion", tiny_model_dir, n_samples=1, ddim_steps=5, strength=0.6, optimize="none")
    records = gen(PROMPTS[:2], images=images)
    model = sd.load(tiny_model_dir)
    direct = Generator(model, GenerationSettings(steps=5, strength=0.6))
    for record, image in zip(records, images):
        expected = direct([record["text"]], [record["seed"]], inputs=ImageInputs(images=[image]))[0]
        assert np.abs(np.asarray(record["image"], np.int16) - np.asarray(expected, np.int16)).max() <= 3
    inpainted = gen(PROMPTS[:2], images=images[0], masks=mask())  # one image and mask for every prompt
    assert len(inpainted) == 2
    with pytest.raises(UserError, match="masks"):
        gen(PROMPTS[:2], images=images, masks=[mask((16, 16)), mask()])
    controlled = pipeline("latent_diffusion", tiny_model_dir, n_samples=2, ddim_steps=3,
                          controlnet=f"{controlnet_dir}:0.5", optimize="none")
    assert len(controlled(PROMPTS[:2], control_images=images)) == 4


def test_a_controlnet_shipped_in_the_package_is_found_by_name(controlnet_dir, monkeypatch, tmp_path):
    import modelzoo.pretrained as pretrained
    from appzoo.latent_diffusion.conditioning import load_controlnets

    shutil.copytree(controlnet_dir, tmp_path / "tiny-canny")
    monkeypatch.setattr(pretrained, "HERE", str(tmp_path))
    assert pretrained.embedded_controlnets() == {"tiny-canny": str(tmp_path / "tiny-canny")}
    (net,) = load_controlnets(["tiny-canny"], "cpu", torch.float32)
    assert type(net).__name__ == "ControlNetModel"


def test_img2img_that_would_redraw_no_step_is_one_line_not_diffusers_error(tiny_model_dir, tmp_path, capsys):
    from easynlp_ldm import cli, pipeline
    from tests.helpers import predict_argv

    table = write_table(tmp_path / "in.tsv", [("0", PROMPTS[0], b64(photo(20)))])
    argv = predict_argv(table, str(tmp_path / "out.tsv"), tiny_model_dir, udp="ddim_steps=1 strength=0.5 optimize=none")
    argv[2] = "--input_schema=idx:str:1,text:str:1,imgbase64:str:1"
    assert cli.main(argv) == 2
    assert ("ddim_steps=1, strength=0.5: num_inference_steps × strength is 1 × 0.5: less than one step of the image "
            "would be redrawn") in capsys.readouterr().err
    gen = pipeline("latent_diffusion", tiny_model_dir, ddim_steps=2, n_samples=1, optimize="none")  # 2 × 0.8 < 2
    assert len(gen(PROMPTS[0], images=photo(20))) == 1
    gen.reset(strength=0.4)
    with pytest.raises(UserError, match="num_inference_steps × strength is 2 × 0.4"):
        gen(PROMPTS[0], images=photo(20))
