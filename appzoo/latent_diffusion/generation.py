"""Prompts + seeds → images: the one generation step predict, evaluate, serve and training's sample images share.

* The settings are a ``GenerationSettings`` (settings.py: its fields, its one mapping from the user-defined
  parameters, its checks).
* Images come from the model family's diffusers pipelines (``StableDiffusionPipeline`` and its variants for SD-1.x)
  over our components, with one seeded generator per image,
  so an image depends on its seed alone, not on the batch it was generated in (up to matmul blocking: with bf16 a
  pixel may differ by 1/255 between batch compositions).
* ``image_seed``: each image's seed from (``--random_seed``, input line, sample number).
* ×4 super-resolution (``SuperResolution``) lives here too.
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import torch
from PIL import Image

from appzoo.latent_diffusion.conditioning import ImageInputs
from appzoo.latent_diffusion.settings import (
    GenerationSettings,
    image_input_problem,
    image_strength,
    pipeline_takes_strength,
)
from easynlp_ldm.errors import UserError
from modelzoo.families import family_of
from modelzoo.families.base import IMG2IMG, INPAINT, TXT2IMG
from modelzoo.ldm import LatentDiffusion
from modelzoo.lora import has_adapters, select_adapters

logger = logging.getLogger("easynlp")


SEED_LIMIT = 2**53  # seeds handed out stay below it: a JSON number any client (a browser's double) holds exactly


def image_seed(random_seed: int, line_number: int, sample: int) -> int:
    """A 53-bit seed per image from (--random_seed, input line number, sample number)."""
    digest = hashlib.sha256(f"{random_seed}:{line_number}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_LIMIT.bit_length() + 1)


# --------------------------------------------------------------------------------------------- the pipeline
def guided_steps(steps: int, cutoff: float) -> int:
    """How many of ``steps`` UNet evaluations run with guidance: at least one, ``ceil(cutoff × steps)``."""
    return max(1, min(steps, math.ceil(cutoff * steps - 1e-9)))


class Stopped(Exception):
    """``should_stop`` said True between two sampler steps: nobody wants these images any more."""


def _step_callback(cutoff: float | None, should_stop):
    """diffusers' ``callback_on_step_end``, run after every sampler step.

    * ``cutoff``: after the guided steps, drop the unconditional half of the batch: diffusers' own switch, as its
      ``SDCFGCutoffCallback`` does (which keeps only the last prompt's embedding, so it breaks batches of several).
      Counted over the sampler's UNet evaluations (``num_timesteps``: Heun-style samplers make two per step).
    * ``should_stop``: raise ``Stopped`` when it says True, so abandoned work ends between steps."""
    def callback(pipeline, step_index, timestep, tensors):
        if should_stop is not None and should_stop():
            raise Stopped(f"stopped after sampler step {step_index + 1}")
        if cutoff is not None and step_index == guided_steps(pipeline.num_timesteps, cutoff) - 1:
            pipeline._guidance_scale = 0.0
            tensors["prompt_embeds"] = tensors["prompt_embeds"].chunk(2)[1]
        return tensors

    return callback


def build_pipeline(model: LatentDiffusion, sampler: str = ""):
    """The family's text-to-image pipeline over ``model``'s components, with the scheduler of ``sampler``."""
    family = family_of(model)
    pipe = family.pipeline(model, TXT2IMG, scheduler=family.scheduler(model, sampler))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.inference_mode()
def generate(model: LatentDiffusion, prompts: list[str], seeds: list[int], settings: GenerationSettings,
             pipe=None, max_length: int | None = None,
             latents: torch.Tensor | None = None, should_stop=None, inputs: ImageInputs | None = None,
             controlnet=None) -> list[Image.Image]:
    """One image per (prompt, seed), before super-resolution. ``latents`` (one per image, as diffusers' pipelines
    take them) replace the initial noise the seeds would draw; the seeds still drive ancestral samplers.
    ``should_stop()``, asked after every sampler step, ends the work with ``Stopped`` when it says True.
    ``inputs``: init images (img2img), masks (inpainting) and conditioning images for ``controlnet`` (the loaded
    ControlNet(s) of ``settings.controlnets``), one per image; diffusers' pipeline for that combination runs."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    pipe = pipe or build_pipeline(model, settings.sampler)
    height = settings.height or model.image_size
    width = settings.width or model.image_size
    family = family_of(model)
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    arguments = family.pipeline_arguments(model, list(prompts), generators, settings, max_length)
    negative = arguments.get("negative_prompt_embeds")
    # Each image's initial noise, drawn in fp32 from its own generator exactly as diffusers' randn_tensor draws it for
    # a single image; the generators then go on to the sampler (ancestral samplers draw from them per step). Drawing
    # here keeps the latents (and so the scheduler arithmetic) fp32 whatever the UNet's precision.
    factor = model.vae_scale_factor
    shape = (1, model.latent_channels, height // factor, width // factor)
    from_noise = not (inputs and inputs.images)  # img2img and inpainting draw their noise in the pipeline
    own_noise = controlnet is not None and not family.controlnet_takes_latents
    if latents is None:
        if from_noise and not own_noise:
            latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    elif not from_noise:
        raise UserError("latents cannot be given with an input image (img2img and inpainting noise the image)")
    elif own_noise:
        raise UserError(f"latents cannot be given with a ControlNet of a {family.name} model (its pipeline draws "
                        f"the noise from the seeds)")
    elif tuple(latents.shape) != (len(prompts), *shape[1:]):
        raise UserError(f"latents must have shape {(len(prompts), *shape[1:])} (one per image), got "
                        f"{tuple(latents.shape)}")
    else:
        latents = latents.float()
    callback = {}
    cutoff = settings.guidance_cutoff if negative is not None and settings.guidance_cutoff < 1 else None
    if cutoff is not None or should_stop is not None:
        callback = {"callback_on_step_end": _step_callback(cutoff, should_stop),
                    "callback_on_step_end_tensor_inputs": ["prompt_embeds"]}
    common = dict(**callback, **arguments)
    if inputs or controlnet is not None:
        output = _generate_from_images(model, pipe, common, settings, inputs or ImageInputs(), controlnet, height,
                                       width, None if latents is None else latents.to(model.device),
                                       len(prompts))
    else:
        output = pipe(**common, **family.txt2img_arguments(model, settings, height, width, latents.to(model.device)))
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in output.images]


def variant(model: LatentDiffusion, pipe, kind: str, controlnet=None):
    """The family's pipeline for ``kind`` (img2img, inpaint; txt2img with a ControlNet) over ``pipe``'s components,
    built once per (kind, ControlNet) and kept on ``pipe``."""
    cache = pipe.__dict__.setdefault("_easynlp_variants", {})
    key = (kind, id(controlnet) if controlnet is not None else None)
    if key not in cache:
        family = family_of(model)
        if (kind, controlnet is not None) not in family.pipelines:
            what = f"{kind} with a ControlNet" if controlnet is not None else kind
            runs = ", ".join(f"{name} with a ControlNet" if with_controlnet else name
                             for name, with_controlnet in family.pipelines)
            raise UserError(f"{family.name} models cannot run {what} here yet (only {runs})")
        try:
            built = family.pipeline(model, kind, controlnet, base=pipe)
        except ValueError as err:  # the family refuses this kind with the chosen sampler
            raise UserError(str(err)) from None
        built.set_progress_bar_config(disable=True)
        cache[key] = built
    return cache[key]


def _generate_from_images(model: LatentDiffusion, pipe, common: dict, settings: GenerationSettings,
                          inputs: ImageInputs, controlnet, height: int, width: int, latents: torch.Tensor, count: int):
    from appzoo.latent_diffusion.conditioning import fit

    problem = image_input_problem(settings.steps, settings.strength, settings.guidance_rescale,
                                  image=bool(inputs.images), mask=bool(inputs.masks),
                                  controlnet=controlnet is not None or bool(inputs.controls),
                                  takes_strength=pipeline_takes_strength(model, mask=bool(inputs.masks),
                                                                         controlnet=controlnet is not None))
    if problem and problem.error:
        raise UserError(problem.message)
    for name, items in (("image", inputs.images), ("mask", inputs.masks)):
        if items is not None and len(items) != count:
            raise ValueError(f"one {name} per image")
    kind = INPAINT if inputs.masks else IMG2IMG if inputs.images else TXT2IMG
    images = [fit(image, width, height) for image in inputs.images] if inputs.images else None
    masks = [mask.convert("L").resize((width, height), Image.NEAREST) if mask.size != (width, height)
             else mask.convert("L") for mask in inputs.masks] if inputs.masks else None
    controls = scales = None
    if controlnet is not None:
        if not inputs.controls or len(inputs.controls) != len(settings.controlnets):
            raise UserError(f"{len(settings.controlnets)} ControlNet(s) need a conditioning image each")
        controls = [[fit(image, width, height) for image in per_net] for per_net in inputs.controls]
        scales = [scale for _, scale in settings.controlnets]
        controls, scales = (controls[0], scales[0]) if len(controls) == 1 else (controls, scales)
    elif inputs.controls:
        raise UserError("a conditioning image was given but no ControlNet: pass controlnet=FOLDER[:scale]")
    pipeline = variant(model, pipe, kind, controlnet)
    return pipeline(**common, **family_of(model).image_arguments(
        model, kind, images=images, masks=masks, controls=controls, control_scales=scales,
        strength=image_strength(settings.strength, bool(inputs.masks)), height=height, width=width, latents=latents))


# ----------------------------------------------------------------------------------------- super-resolution
class SuperResolution:
    """The model's ESRGAN ×4, loaded once per model and shared by every ``Generator`` that asks for it."""

    def __init__(self, model: LatentDiffusion):
        if not model.esrgan_path:
            raise UserError("do_sr=True but the model has no RRDB_ESRGAN_x4.pth beside its weights; add the file to "
                            "the model folder or drop do_sr")
        from modelzoo.esrgan import load_rrdbnet

        try:
            self.net = load_rrdbnet(model.esrgan_path).to(model.device)
        except ValueError as err:
            raise UserError(str(err)) from None

    @classmethod
    def of(cls, model: LatentDiffusion) -> SuperResolution:
        if getattr(model, "_super_resolution", None) is None:
            model._super_resolution = cls(model)
        return model._super_resolution

    def __call__(self, image: Image.Image, tile: int, channel_order: str) -> Image.Image:
        from modelzoo.esrgan import upscale

        return upscale(self.net, image, tile=tile, channel_order=channel_order)


def controlnet_of(model: LatentDiffusion, specs: tuple[tuple[str, float], ...]):
    """The ControlNet (one, or the family's ``multi_controlnet_class`` of several) for ``specs``, loaded once per
    model and set of folders as the family's ``controlnet_class``, on the denoiser's device and dtype; None without
    specs."""
    if not specs:
        return None
    cache = model.__dict__.setdefault("_controlnets", {})
    paths = tuple(path for path, _ in specs)
    if paths not in cache:
        from appzoo.latent_diffusion.conditioning import load_controlnets

        family = family_of(model)
        if len(paths) > 1 and not family.multi_controlnet_class:
            raise UserError(f"controlnet=: {family.name} models run one ControlNet at a time, got {len(paths)}")
        models = load_controlnets(list(paths), model.device, model.dtype, family.controlnet_class)
        if len(models) == 1:
            cache[paths] = models[0]
        else:
            import diffusers

            cache[paths] = getattr(diffusers, family.multi_controlnet_class)(models)
    return cache[paths]


class Generator:
    """Prompts + seeds → PIL images with one model and one ``GenerationSettings``."""

    def __init__(self, model: LatentDiffusion, settings: GenerationSettings, text_length: int | None = None):
        self.model = model
        self.settings = settings.for_model(model)
        try:
            self.pipe = build_pipeline(model, self.settings.sampler)
        except ValueError as err:
            raise UserError(f"--user_defined_parameters: sampler: {err}") from None
        self.text_length = text_length
        self.sr = SuperResolution.of(model) if self.settings.do_sr else None
        self.controlnet = controlnet_of(model, self.settings.controlnets)

    def __call__(self, prompts: list[str], seeds: list[int], latents: torch.Tensor | None = None,
                 should_stop=None, inputs: ImageInputs | None = None) -> list[Image.Image]:
        if has_adapters(getattr(self.model, family_of(self.model).denoiser)):
            select_adapters(self.pipe, self.settings.adapters)
        if inputs is not None and inputs.controls is not None:
            from appzoo.latent_diffusion.conditioning import preprocess_control

            inputs = ImageInputs(inputs.images, inputs.masks, [
                [preprocess_control(image, self.settings.control_preprocessor) for image in per_net]
                for per_net in inputs.controls])
        images = generate(self.model, prompts, seeds, self.settings, self.pipe, self.text_length, latents,
                          should_stop, inputs, self.controlnet)
        if self.sr is None:
            return images
        upscaled = []
        for image in images:
            if should_stop is not None and should_stop():
                raise Stopped("stopped before super-resolution")
            upscaled.append(self.sr(image, self.settings.sr_tile, self.settings.sr_channel_order))
        return upscaled
