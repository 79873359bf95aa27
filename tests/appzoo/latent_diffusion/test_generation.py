"""generation.py: diffusers parity per sampler, one seed one image whatever the batch, guidance cutoff and rescale,
super-resolution."""


import dataclasses

import numpy as np
import pytest
import torch

from easynlp_ldm import cli
from modelzoo.families import sd
from tests.helpers import PROMPTS, decode, predict_argv, read_rows


@pytest.mark.parametrize("sampler,guidance", [("", 5.0), ("euler-ancestral", 7.5), ("ddim", 3.0)])
def test_parity_with_diffusers_pipeline(tiny_model_dir, prompts_table, tmp_path, sampler, guidance):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    out = str(tmp_path / "o.tsv")
    argv = predict_argv(prompts_table, out, tiny_model_dir, "--output_schema=text,seed,gen_imgbase64",
                        udp=f"n_samples=1 ddim_steps=6 scale={guidance} optimize=none"
                        + (f" sampler={sampler}" if sampler else ""))
    assert cli.main(argv) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    swap = {"euler-ancestral": EulerAncestralDiscreteScheduler, "ddim": DDIMScheduler}.get(sampler)
    if swap:  # the pipeline's constructor applies its scheduler fixes (e.g. DDIM's clip_sample=False for latents)
        pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": swap.from_config(pipe.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    for prompt, seed, cell in read_rows(out)[:2]:
        reference = pipe(prompt, generator=torch.Generator("cpu").manual_seed(int(seed)), num_inference_steps=6,
                         guidance_scale=guidance, height=32, width=32).images[0]
        difference = np.abs(decode(cell) - np.asarray(reference, dtype=np.int16)).max()
        assert difference <= 3, difference


def test_image_depends_on_seed_not_batch(tiny_model_dir):
    from appzoo.latent_diffusion.generation import Generator
    from appzoo.latent_diffusion.settings import GenerationSettings

    model = sd.load(tiny_model_dir)
    generate = Generator(model, GenerationSettings(steps=4))
    alone = np.asarray(generate([PROMPTS[1]], [1234])[0], dtype=np.int16)
    crowd = generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], [99, 1234, 5])
    assert np.abs(np.asarray(crowd[1], dtype=np.int16) - alone).max() <= 1
    assert np.abs(np.asarray(crowd[0], dtype=np.int16) - alone).max() > 10


def test_super_resolution_with_model_rrdb(tmp_path, prompts_table):
    from modelzoo.esrgan import RRDBNet
    from modelzoo.tiny import make_tiny_diffusers_model

    torch.manual_seed(0)
    rrdb = RRDBNet(nf=8, nb=1, gc=4).state_dict()
    model = make_tiny_diffusers_model(str(tmp_path / "m"), esrgan_state=rrdb)
    out = str(tmp_path / "o.tsv")
    assert cli.main(predict_argv(prompts_table, out, model, udp="n_samples=1 ddim_steps=2 do_sr=True sr_tile=8")) == 0
    assert decode(read_rows(out)[0][2]).shape == (128, 128, 3)


def test_guidance_cutoff_matches_diffusers_callback_and_halves_late_steps(tiny_model_dir, prompts_table, tmp_path):
    """guidance_cutoff=0.75 of 4 steps: 3 guided UNet calls on 2×batch, then 1 on the batch alone — what diffusers'
    SDCFGCutoffCallback(cutoff_step_ratio=0.5) does for a single prompt; and batches of several prompts work."""
    from diffusers import StableDiffusionPipeline
    from diffusers.callbacks import SDCFGCutoffCallback

    from appzoo.latent_diffusion.generation import Generator
    from appzoo.latent_diffusion.settings import GenerationSettings

    settings = GenerationSettings(steps=4, guidance_cutoff=0.75)
    model = sd.load(tiny_model_dir)
    batch_sizes = []
    model.unet.register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    generate = Generator(model, settings)
    images = generate(PROMPTS[:3], [7, 8, 9])
    assert batch_sizes == [6, 6, 6, 3]
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for prompt, seed, image in zip(PROMPTS[:3], [7, 8, 9], images):
        reference = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=4,
                         guidance_scale=5.0, height=32, width=32,
                         callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5)).images[0]
        assert np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reference, dtype=np.int16)).max() <= 3
    batch_sizes.clear()
    Generator(model, GenerationSettings(steps=4))([PROMPTS[0]], [7])
    assert batch_sizes == [2, 2, 2, 2]  # the default guides every step, as diffusers does


def test_guidance_rescale_matches_diffusers_and_reaches_every_vocabulary(tiny_model_dir, prompts_table, tmp_path):
    """guidance_rescale (a GenerationSettings field) is what diffusers' pipeline computes with the same argument, and
    --user_defined_parameters reach it (the HTTP field is tested with serve)."""
    from diffusers import StableDiffusionPipeline

    from appzoo.latent_diffusion.generation import Generator
    from appzoo.latent_diffusion.params import default_params
    from appzoo.latent_diffusion.settings import GenerationSettings

    settings = GenerationSettings(steps=4, guidance_scale=9.0, guidance_rescale=0.7)
    assert GenerationSettings.from_params(default_params(ddim_steps=4, scale=9.0, guidance_rescale=0.7)) == settings
    model = sd.load(tiny_model_dir)
    rescaled = Generator(model, settings)(PROMPTS[:2], [3, 4])
    plain = Generator(model, dataclasses.replace(settings, guidance_rescale=0.0))(PROMPTS[:2], [3, 4])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for prompt, seed, image, base in zip(PROMPTS[:2], [3, 4], rescaled, plain):
        reference = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=4,
                         guidance_scale=9.0, guidance_rescale=0.7, height=32, width=32).images[0]
        ours = np.asarray(image, dtype=np.int16)
        assert np.abs(ours - np.asarray(reference, dtype=np.int16)).max() <= 3
        assert np.abs(ours - np.asarray(base, dtype=np.int16)).max() > 3  # the setting changes the image
    out = str(tmp_path / "o.tsv")
    assert cli.main(predict_argv(prompts_table, out, tiny_model_dir, "--output_schema=text,seed,gen_imgbase64",
                                 udp="n_samples=1 ddim_steps=4 scale=9 guidance_rescale=0.7 optimize=none")) == 0
    prompt, seed, cell = read_rows(out)[0]
    reference = pipe(prompt, generator=torch.Generator("cpu").manual_seed(int(seed)), num_inference_steps=4,
                     guidance_scale=9.0, guidance_rescale=0.7, height=32, width=32).images[0]
    assert np.abs(decode(cell) - np.asarray(reference, dtype=np.int16)).max() <= 3
    assert cli.main(predict_argv(prompts_table, out, tiny_model_dir, udp="guidance_rescale=2")) == 2


def test_negative_prompt_counts_for_a_wukong_model():
    """EasyNLP's Wukong encoder gives n_repeat embeddings per prompt, not one per token: the negative prompt was
    tokenised to that length ([CLS] [SEP], the empty prompt) and silently had no effect."""
    from appzoo.latent_diffusion.generation import Generator
    from appzoo.latent_diffusion.settings import GenerationSettings
    from tests.helpers import EASYNLP_DATA

    model = sd.load(EASYNLP_DATA)
    plain, negative = (np.asarray(Generator(model, GenerationSettings(steps=2, negative_prompt=text))(
        ["一只红色的圆形"], [7])[0], dtype=np.int16) for text in ("", "蓝色三角形"))
    assert np.abs(plain - negative).max() > 0
