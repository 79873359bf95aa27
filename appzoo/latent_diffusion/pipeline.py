"""Text → images with diffusers' own ``StableDiffusionPipeline`` over our components, one seeded generator per
image (so an image depends on its seed alone, not on the batch it was generated in)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

from modelzoo.ldm import LatentDiffusion
from modelzoo.samplers import make_scheduler


def _import_pipeline_class():
    """diffusers' pipeline module imports transformers' CLIP image processor (for a safety checker we never use),
    which without torchvision warns on every command; that line says nothing to our users."""
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        from diffusers import StableDiffusionPipeline
    finally:
        transformers_logging.set_verbosity(verbosity)
    return StableDiffusionPipeline


StableDiffusionPipeline = _import_pipeline_class()


@dataclass
class GenerationSettings:
    steps: int = 20
    guidance_scale: float = 5.0
    height: int = 0
    width: int = 0
    sampler: str = ""
    negative_prompt: str = ""
    eta: float = 0.0
    guidance_cutoff: float = 1.0  # fraction of the steps (the first ones) run with classifier-free guidance


def guided_steps(steps: int, cutoff: float) -> int:
    """How many of ``steps`` UNet evaluations run with guidance: at least one, ``ceil(cutoff × steps)``."""
    return max(1, min(steps, math.ceil(cutoff * steps - 1e-9)))


def _guidance_cutoff_callback(cutoff: float):
    """After the guided steps, drop the unconditional half of the batch: diffusers' own switch, as its
    ``SDCFGCutoffCallback`` does (which keeps only the last prompt's embedding, so it breaks batches of several).
    Counted over the sampler's UNet evaluations (``num_timesteps``: Heun-style samplers make two per step)."""
    def callback(pipeline, step_index, timestep, tensors):
        if step_index == guided_steps(pipeline.num_timesteps, cutoff) - 1:
            pipeline._guidance_scale = 0.0
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[1]
        return tensors

    return callback


def build_pipeline(model: LatentDiffusion, sampler: str = "") -> StableDiffusionPipeline:
    scheduler = make_scheduler(sampler, model.scheduler_config, model.scheduler_class)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.inference_mode()
def generate(model: LatentDiffusion, prompts: list[str], seeds: list[int], settings: GenerationSettings,
             pipe: StableDiffusionPipeline | None = None, max_length: int | None = None) -> list[Image.Image]:
    """One image per (prompt, seed)."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    pipe = pipe or build_pipeline(model, settings.sampler)
    height = settings.height or model.image_size
    width = settings.width or model.image_size
    prompt_embeds = model.encode_prompts(list(prompts), max_length)
    negative = None
    if settings.guidance_scale > 1:
        negative = model.encode_prompts([settings.negative_prompt] * len(prompts), prompt_embeds.shape[1])
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    # Each image's initial noise, drawn in fp32 from its own generator exactly as diffusers' randn_tensor draws it for
    # a single image; the generators then go on to the sampler (ancestral samplers draw from them per step). Drawing
    # here keeps the latents (and so the scheduler arithmetic) fp32 whatever the UNet's precision.
    factor = model.vae_scale_factor
    shape = (1, model.latent_channels, height // factor, width // factor)
    latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    cutoff = {}
    if negative is not None and settings.guidance_cutoff < 1:
        cutoff = {"callback_on_step_end": _guidance_cutoff_callback(settings.guidance_cutoff),
                  "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
    output = pipe(**cutoff, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, height=height, width=width,
                  num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale, eta=settings.eta,
                  generator=generators, latents=latents.to(model.unet.device), output_type="np")
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in output.images]
