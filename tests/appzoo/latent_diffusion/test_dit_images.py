"""Z-Image and Qwen-Image from images (issue 32): img2img, inpainting and ControlNet through predict's table columns
equal the families' diffusers pipelines (``ZImageImg2ImgPipeline``, ``QwenImageControlNetPipeline``, …) called by
hand with the same seeds (fp32, optimize=none, within 3/255); serve gives predict's image for the same request; what
these families cannot run from images is a one-line error."""

import httpx
import numpy as np
import pytest
import torch

from appzoo.latent_diffusion.conditioning import ImageInputs
from appzoo.latent_diffusion.generation import Generator
from appzoo.latent_diffusion.settings import GenerationSettings
from easynlp_ldm import cli
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import encode_image_base64
from modelzoo import families
from modelzoo.tiny_dit import (
    make_tiny_qwenimage_controlnet,
    make_tiny_qwenimage_model,
    make_tiny_zimage_controlnet,
    make_tiny_zimage_model,
)
from tests.helpers import InProcessServer, decode, mask, photo, png, predict_argv, read_rows, swap_flow_sampler

PROMPTS = ["一个红色的圆形", "dance monkey in a blue square"]
STEPS = 2
TOLERANCE = 3  # of 255
# family → (model builder, ControlNet builder, diffusers' class prefix, its user_defined_parameters, its pipeline's
# arguments for them)
FAMILIES = {
    "zimage": (make_tiny_zimage_model, make_tiny_zimage_controlnet, "ZImage",
               dict(scale=3.0, negative_prompt="bad", cfg_truncation=0.9),
               dict(guidance_scale=3.0, negative_prompt="bad", cfg_truncation=0.9)),
    "qwenimage": (make_tiny_qwenimage_model, make_tiny_qwenimage_controlnet, "QwenImage",
                  dict(true_cfg_scale=3.0, negative_prompt="bad"), dict(true_cfg_scale=3.0, negative_prompt="bad")),
}
# kind → (its pipeline's class suffix, the table's image columns, its user_defined_parameters). Inpainting leaves
# strength out: 1.0, as for SD-1.x.
KINDS = {
    "img2img": ("Img2ImgPipeline", ("imgbase64",), "strength=0.7"),
    "inpaint": ("InpaintPipeline", ("imgbase64", "mask"), ""),
    "controlnet": ("ControlNetPipeline", ("control",), "controlnet={controlnet}:0.7"),
}


def _udp(params):
    return " ".join(f"{key}={value}" for key, value in params.items())


def _images(line):
    """Row ``line``'s image columns: the init image (or conditioning image) and the mask."""
    return {"imgbase64": photo(40 + line), "control": photo(50 + line), "mask": mask()}


def _hand_arguments(kind, line):
    images = _images(line)
    return {"img2img": dict(image=images["imgbase64"], strength=0.7),
            "inpaint": dict(image=images["imgbase64"], mask_image=images["mask"], strength=1.0),
            "controlnet": dict(control_image=images["control"], controlnet_conditioning_scale=0.7)}[kind]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_images")
    return {name: (make(str(root / name)), make_controlnet(str(root / f"{name}_controlnet")))
            for name, (make, make_controlnet, *_) in FAMILIES.items()}


@pytest.fixture(scope="module")
def predicted(folders, tmp_path_factory):
    """(family, kind) → predict's rows (line, seed, image) for PROMPTS, one sample each, from the kind's columns."""
    root = tmp_path_factory.mktemp("dit_images_predict")
    rows = {}
    for name, (folder, controlnet) in folders.items():
        for kind, (_, columns, udp) in KINDS.items():
            table, out = root / f"{name}_{kind}.tsv", root / f"{name}_{kind}_out.tsv"
            table.write_text("".join("\t".join([str(line), prompt] + [encode_image_base64(_images(line)[column])
                                                                      for column in columns]) + "\n"
                                     for line, prompt in enumerate(PROMPTS)), encoding="utf-8")
            parameters = (f"ddim_steps={STEPS} n_samples=1 optimize=none {_udp(FAMILIES[name][3])} "
                          f"{udp.format(controlnet=controlnet)}")
            argv = predict_argv(table, out, folder, "--output_schema=idx,seed,gen_imgbase64", udp=parameters)
            argv[2] = "--input_schema=" + ",".join(["idx:str:1", "text:str:1"] + [f"{c}:str:1" for c in columns])
            assert cli.main(argv) == 0
            rows[name, kind] = [(int(idx), int(seed), decode(cell)) for idx, seed, cell in read_rows(out)]
    return rows


def _hand_pipeline(folder, controlnet, name, kind):
    """The kind's diffusers pipeline over the folder's components, built as a diffusers user builds it."""
    import diffusers

    prefix = FAMILIES[name][2]
    base = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    extra = {}
    if kind == "controlnet":
        extra["controlnet"] = getattr(diffusers, f"{prefix}ControlNetModel").from_pretrained(controlnet)
    pipe = getattr(diffusers, prefix + KINDS[kind][0])(**base.components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _by_hand(pipe, name, kind, line, seed, **overrides):
    arguments = {**FAMILIES[name][4], **_hand_arguments(kind, line), **overrides}
    image = pipe(PROMPTS[line], height=32, width=32, num_inference_steps=STEPS, output_type="np",
                 generator=torch.Generator().manual_seed(seed), **arguments).images[0]
    return (image * 255).round().astype(np.int16)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_predict_from_images_equals_the_diffusers_pipeline_called_by_hand(folders, predicted, name, kind):
    pipe = _hand_pipeline(*folders[name], name, kind)
    assert [line for line, _, _ in predicted[name, kind]] == [0, 1]
    for line, seed, image in predicted[name, kind]:
        expected = _by_hand(pipe, name, kind, line, seed)
        assert image.shape == expected.shape == (32, 32, 3)
        assert np.abs(image - expected).max() <= TOLERANCE, (name, kind, line)
    if kind == "controlnet":  # the ControlNet acted
        line, seed, image = predicted[name, kind][0]
        unconditioned = _by_hand(pipe, name, kind, line, seed, controlnet_conditioning_scale=0.0)
        assert np.abs(image - unconditioned).max() > 10


@pytest.mark.parametrize("name,kind", [("zimage", "img2img"), ("qwenimage", "controlnet")])
def test_serve_gives_predicts_image_for_the_same_request(folders, predicted, name, kind):
    folder, controlnet = folders[name]
    params = dict(FAMILIES[name][3])
    fields = {"num_inference_steps": STEPS}
    line, seed, image = predicted[name, kind][1]
    if kind == "controlnet":
        params["controlnet"] = f"{controlnet}:0.7"
        fields["control_image"] = encode_image_base64(_images(line)["control"])
    else:
        fields.update(image=encode_image_base64(_images(line)["imgbase64"]), strength=0.7)
    server = InProcessServer(folder, optimize="none", **params)
    try:
        response = httpx.post(server.url + "/", json={"text": PROMPTS[line], "num_images": 1, "seed": seed, **fields},
                              timeout=60)
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    served = np.asarray(png(response.json()["images_base64"][0]).convert("RGB"), dtype=np.int16)
    assert np.abs(served - image).max() <= 1


def test_what_these_families_cannot_run_from_images_is_one_line(folders):
    folder, controlnet = folders["zimage"]
    model = families.load(folder)
    settings = GenerationSettings(steps=STEPS, controlnets=((controlnet, 0.7),))
    generate = Generator(model, settings)
    with pytest.raises(UserError, match="zimage models cannot run img2img with a ControlNet here yet"):
        generate(PROMPTS[:1], [1], inputs=ImageInputs(images=[photo(1)], controls=[[photo(2)]]))
    with pytest.raises(UserError, match="zimage models run one ControlNet at a time, got 2"):
        Generator(model, GenerationSettings(steps=STEPS, controlnets=((controlnet, 0.7), (controlnet, 0.5))))
    with pytest.raises(UserError, match="a QwenImageControlNetModel folder, but this model takes a "
                                        "ZImageControlNetModel"):
        Generator(model, GenerationSettings(steps=STEPS, controlnets=((folders["qwenimage"][1], 0.7),)))


# ControlNet inpainting: family → the table's columns (the input image, its mask, the conditioning image) for row
# ``line``, and its pipeline's arguments for them. Qwen-Image's pipeline takes no init image: its ControlNet reads the
# image it repaints under the mask (control_image, control_mask), so the conditioning image is that image.
INPAINT_CONTROL = {
    "zimage": (lambda line: (photo(40 + line), mask(), photo(50 + line)),
               lambda image, mask_image, control: dict(image=image, mask_image=mask_image, control_image=control)),
    "qwenimage": (lambda line: (photo(40 + line), mask(), photo(40 + line)),
                  lambda image, mask_image, control: dict(control_image=control, control_mask=mask_image)),
}


@pytest.fixture(scope="module")
def inpainting_controlnets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit_inpainting_controlnets")
    return {name: FAMILIES[name][1](str(root / name), inpainting=True) for name in FAMILIES}


def _inpaint_by_hand(folder, controlnet, name, line, seed, sampler=None, steps=STEPS, **overrides):
    """diffusers' ControlNet inpainting pipeline of the family, called as its docs call it, after
    torch.manual_seed(seed) (Qwen-Image's samples its control image's latents from torch's global generator);
    ``sampler``: its scheduler swapped in."""
    import diffusers

    prefix = FAMILIES[name][2]
    base = diffusers.DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    net = getattr(diffusers, f"{prefix}ControlNetModel").from_pretrained(controlnet)
    pipe = getattr(diffusers, f"{prefix}ControlNetInpaintPipeline")(**base.components, controlnet=net)
    pipe.set_progress_bar_config(disable=True)
    if sampler:
        swap_flow_sampler(pipe, sampler)
    columns, arguments = INPAINT_CONTROL[name]
    torch.manual_seed(seed)
    image = pipe(PROMPTS[line], height=32, width=32, num_inference_steps=steps, output_type="np",
                 generator=torch.Generator().manual_seed(seed),
                 **{**FAMILIES[name][4], **arguments(*columns(line)), "controlnet_conditioning_scale": 0.7,
                    **overrides}).images[0]
    return (image * 255).round().astype(np.int16)


def _predict_controlnet_inpainting(folder, controlnet, name, root, udp):
    """predict's rows (line, seed, image) of PROMPTS inpainted with ``controlnet`` (INPAINT_CONTROL's columns)."""
    columns = INPAINT_CONTROL[name][0]
    table, out = root / "table.tsv", root / "out.tsv"
    table.write_text("".join("\t".join([str(line), prompt] + [encode_image_base64(image) for image in columns(line)])
                             + "\n" for line, prompt in enumerate(PROMPTS)), encoding="utf-8")
    argv = predict_argv(table, out, folder, "--output_schema=idx,seed,gen_imgbase64", "--micro_batch_size=2",
                        udp=f"n_samples=1 optimize=none {_udp(FAMILIES[name][3])} controlnet={controlnet}:0.7 {udp}")
    argv[2] = "--input_schema=idx:str:1,text:str:1,imgbase64:str:1,mask:str:1,control:str:1"
    assert cli.main(argv) == 0
    rows = [(int(idx), int(seed), decode(cell)) for idx, seed, cell in read_rows(out)]
    assert [line for line, _, _ in rows] == [0, 1]
    return rows


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_controlnet_inpainting_equals_the_diffusers_pipeline_called_by_hand_and_serve_gives_its_image(
        folders, inpainting_controlnets, tmp_path, name):
    folder, controlnet = folders[name][0], inpainting_controlnets[name]
    columns = INPAINT_CONTROL[name][0]
    rows = _predict_controlnet_inpainting(folder, controlnet, name, tmp_path, f"ddim_steps={STEPS}")
    for line, seed, image in rows:
        expected = _inpaint_by_hand(folder, controlnet, name, line, seed)
        assert np.abs(image - expected).max() <= TOLERANCE, (name, line)
    line, seed, image = rows[1]
    unconditioned = _inpaint_by_hand(folder, controlnet, name, line, seed, controlnet_conditioning_scale=0.0)
    assert np.abs(image - unconditioned).max() > 10  # the ControlNet acted

    image_, mask_, control = (encode_image_base64(image) for image in columns(line))
    server = InProcessServer(folder, optimize="none", controlnet=f"{controlnet}:0.7", **FAMILIES[name][3])
    try:
        response = httpx.post(server.url + "/", json={"text": PROMPTS[line], "num_images": 1, "seed": seed,
                                                      "num_inference_steps": STEPS, "image": image_, "mask": mask_,
                                                      "control_image": control}, timeout=60)
    finally:
        server.stop()
    assert response.status_code == 200, response.text
    served = np.asarray(png(response.json()["images_base64"][0]).convert("RGB"), dtype=np.int16)
    assert np.abs(served - image).max() <= 1


def test_unipc_runs_qwenimage_controlnet_inpainting_which_starts_from_noise(folders, inpainting_controlnets, tmp_path):
    """QwenImageControlNetInpaintPipeline repaints the mask from noise (it never calls scale_noise): sampler=unipc
    gives the pipeline's image with UniPC swapped in, not the folder's euler."""
    folder, controlnet = folders["qwenimage"][0], inpainting_controlnets["qwenimage"]
    rows = _predict_controlnet_inpainting(folder, controlnet, "qwenimage", tmp_path, "ddim_steps=4 sampler=unipc")
    for line, seed, image in rows:
        expected = _inpaint_by_hand(folder, controlnet, "qwenimage", line, seed, sampler="unipc", steps=4)
        assert np.abs(image - expected).max() <= TOLERANCE, line
    line, seed, image = rows[0]
    assert np.abs(image - _inpaint_by_hand(folder, controlnet, "qwenimage", line, seed, steps=4)).max() > TOLERANCE


def test_what_controlnet_inpainting_cannot_take_is_one_line(folders, inpainting_controlnets):
    """No ControlNet img2img pipeline exists for these models: refused naming what runs; ControlNet inpainting takes
    no strength; Qwen-Image's reads the image it repaints, so another conditioning image is refused."""
    def generate(name, strength=0.0, control=None, controlnet=None, masked=True, steps=STEPS):
        model = families.load(folders[name][0])
        settings = GenerationSettings(steps=steps, strength=strength,
                                      controlnets=((controlnet or inpainting_controlnets[name], 0.7),))
        inputs = ImageInputs(images=[photo(1)] if masked else None, masks=[mask()] if masked else None,
                             controls=[[control or photo(1)]])
        Generator(model, settings)(PROMPTS[:1], [1], inputs=inputs)

    # A ControlNet whose inputs have no place in the kind asked for
    with pytest.raises(UserError, match="controlnet=: this QwenImageControlNetModel is an inpainting ControlNet: "
                                        "give it an input image and its mask$"):
        generate("qwenimage", masked=False)
    for name in FAMILIES:
        with pytest.raises(UserError, match=f"controlnet=: this {FAMILIES[name][2]}ControlNetModel has no inpainting "
                                            f"inputs .*: it conditions txt2img only; leave the mask out"):
            generate(name, controlnet=folders[name][1])

    model = families.load(folders["qwenimage"][0])
    settings = GenerationSettings(steps=STEPS, controlnets=((inpainting_controlnets["qwenimage"], 0.7),))
    with pytest.raises(UserError, match=r"qwenimage models cannot run img2img with a ControlNet here yet \(only "
                                        r"txt2img, img2img, inpaint, txt2img with a ControlNet, inpaint with a "
                                        r"ControlNet\)"):
        Generator(model, settings)(PROMPTS[:1], [1], inputs=ImageInputs(images=[photo(1)], controls=[[photo(2)]]))
    for steps in (STEPS, 1):  # not the strength × steps check of a pipeline that takes strength (1 × 0.5 < 1)
        with pytest.raises(UserError, match="strength=0.5: zimage models inpaint with a ControlNet from noise .* "
                                            "leave strength at 1"):
            generate("zimage", strength=0.5, steps=steps)
    with pytest.raises(UserError, match="qwenimage models inpaint with a ControlNet that reads the image it repaints "
                                        "under the mask: give that image as the conditioning image too"):
        generate("qwenimage", control=photo(2))
