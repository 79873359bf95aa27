"""Prompts + seeds → images: the one generation step predict, evaluate, serve and training's sample images share.

* ``GenerationSettings`` is the one vocabulary of sampling settings. It is frozen and hashable: serve batches the
  requests whose settings are equal. Each outside vocabulary is mapped to it in exactly one place —
  ``GenerationSettings.from_params`` for ``--user_defined_parameters`` (EasyNLP's names, ``PARAM_NAMES``) and
  ``serve.REQUEST_FIELDS`` for an HTTP request. Adding a sampling setting is its field here, its pass-through in
  ``generate``, and one entry per vocabulary.
* Images come from diffusers' own ``StableDiffusionPipeline`` over our components, with one seeded generator per image,
  so an image depends on its seed alone, not on the batch it was generated in (up to matmul blocking: with bf16 a
  pixel may differ by 1/255 between batch compositions).
* ``image_seed``: each image's seed from (``--random_seed``, input line, sample number).
* Size rules (``size_factor``) and ×4 super-resolution (``SuperResolution``) live here too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers.utils import logging as transformers_logging

from appzoo.latent_diffusion.conditioning import ImageInputs
from easynlp_ldm.errors import UserError
from modelzoo.ldm import LatentDiffusion
from modelzoo.lora import has_adapters, select_adapters
from modelzoo.samplers import eta_samplers, make_scheduler, sampler_label, scheduler_class_name, step_takes

logger = logging.getLogger("easynlp")


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


@dataclass(frozen=True)
class GenerationSettings:
    steps: int = 20
    guidance_scale: float = 5.0
    height: int = 0  # pixels; 0: the model's native size (``for_model`` fills it in)
    width: int = 0
    sampler: str = ""  # a sampler's short name; "": the model's own scheduler
    negative_prompt: str = ""
    eta: float = 0.0  # DDIM's stochasticity
    guidance_cutoff: float = 1.0  # fraction of the steps (the first ones) run with classifier-free guidance
    guidance_rescale: float = 0.0  # rescales the guided prediction's std to the text one's (Lin et al. 2023, §3.4)
    do_sr: bool = False  # ESRGAN ×4 after decoding
    sr_tile: int = 256  # super-resolution tile, input pixels (0: whole image)
    sr_channel_order: str = ""  # rgb or bgr; "": the model's config, else rgb
    adapters: tuple[tuple[str, float], ...] = ()  # switchable LoRA adapters (serve's lora_library) and their scales
    strength: float = 0.0  # img2img / inpainting: how much of the init image is noised away (0: 0.8, 1.0 inpainting)
    controlnets: tuple[tuple[str, float], ...] = ()  # ControlNet folders and their conditioning scales
    control_preprocessor: str = "none"  # what turns a conditioning image into the ControlNet's input (none, canny)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> GenerationSettings:
        """``--user_defined_parameters`` (EasyNLP's names) → settings."""
        from appzoo.latent_diffusion.conditioning import parse_controlnets

        settings = cls(**{field: params[name] for field, name in PARAM_NAMES.items()},
                       controlnets=parse_controlnets(params.get("controlnet", "")))
        for note in settings.unused_settings():
            logger.warning(note)
        return settings

    def for_model(self, model: LatentDiffusion) -> GenerationSettings:
        """The concrete settings for ``model``: native size and ESRGAN channel order filled in, size checked."""
        settings = dataclasses.replace(self, height=self.height or model.image_size,
                                       width=self.width or model.image_size, sr_channel_order=self.sr_channel_order or
                                       model.extra.get("esrgan_channel_order", "rgb"))
        check_size(model, settings.height, settings.width)
        problem = eta_problem(settings.eta, settings.sampler, model.scheduler_class)
        if problem:
            raise UserError(problem)
        return settings

    def unused_settings(self) -> list[str]:
        """Notes on the user's settings that the others leave without effect (each would otherwise be silently
        ignored): guidance's companions without guidance, ESRGAN's without do_sr, a preprocessor without a
        ControlNet."""
        notes = []
        if self.guidance_scale <= 1:  # diffusers runs classifier-free guidance only above 1
            given = [f"{PARAM_NAMES[name]}={value!r}" for name, value, default in (
                ("negative_prompt", self.negative_prompt, ""), ("guidance_cutoff", self.guidance_cutoff, 1.0),
                ("guidance_rescale", self.guidance_rescale, 0.0)) if value != default]
            if given:
                notes.append(f"{', '.join(given)} has no effect with scale={self.guidance_scale:g}: classifier-free "
                             f"guidance runs only with scale > 1")
        if not self.do_sr:
            given = [f"{PARAM_NAMES[name]}={value!r}" for name, value, default in (
                ("sr_tile", self.sr_tile, 256), ("sr_channel_order", self.sr_channel_order, "")) if value != default]
            if given:
                notes.append(f"{', '.join(given)} has no effect without do_sr=True")
        if self.control_preprocessor != "none" and not self.controlnets:
            notes.append(f"control_preprocessor={self.control_preprocessor} has no effect without controlnet=")
        return notes


def eta_problem(eta: float, sampler: str, model_scheduler_class: str) -> str | None:
    """Why ``ddim_eta`` cannot apply with ``sampler`` (diffusers passes eta only to a scheduler whose step takes it, and
    would silently ignore it otherwise; EasyNLP's PLMS sampler refused it), or None. An unknown sampler name is left
    to ``make_scheduler`` to report."""
    class_name = scheduler_class_name(sampler, model_scheduler_class)
    if not eta or class_name is None or step_takes(class_name, "eta"):
        return None
    choices = "|".join(eta_samplers())
    return (f"ddim_eta={eta:g} cannot apply to {sampler_label(sampler, model_scheduler_class)}: DDIM's eta "
            f"applies only to sampler={choices}; set sampler={choices} or leave ddim_eta at 0")


def image_strength(strength: float, inpainting: bool) -> float:
    """The strength an img2img (0.8) or inpainting (1.0) run uses when ``strength`` is 0 (not given)."""
    return strength or (1.0 if inpainting else 0.8)


def redraw_problem(steps: int, strength: float, inpainting: bool) -> str | None:
    """Why generation from an image at ``strength`` would redraw no step (diffusers then fails), or None."""
    strength = image_strength(strength, inpainting)
    if int(steps * strength) >= 1:
        return None
    return (f"num_inference_steps × strength is {steps} × {strength:g}: less than one step of the image would be "
            f"redrawn; raise strength or num_inference_steps")


# GenerationSettings field → its user_defined_parameter (declared in params.py).
PARAM_NAMES = {"steps": "ddim_steps", "guidance_scale": "scale", "height": "H", "width": "W", "sampler": "sampler",
               "negative_prompt": "negative_prompt", "eta": "ddim_eta", "guidance_cutoff": "guidance_cutoff",
               "guidance_rescale": "guidance_rescale", "strength": "strength",
               "control_preprocessor": "control_preprocessor",
               "do_sr": "do_sr", "sr_tile": "sr_tile", "sr_channel_order": "sr_channel_order"}


SEED_LIMIT = 2**53  # seeds handed out stay below it: a JSON number any client (a browser's double) holds exactly


def image_seed(random_seed: int, line_number: int, sample: int) -> int:
    """A 53-bit seed per image from (--random_seed, input line number, sample number)."""
    digest = hashlib.sha256(f"{random_seed}:{line_number}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_LIMIT.bit_length() + 1)


def size_factor(model: LatentDiffusion) -> int:
    """Image sizes must be multiples of this: the VAE factor × the UNet's downsampling, and 8 (diffusers')."""
    return math.lcm(8, model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1))


def check_size(model: LatentDiffusion, height: int, width: int) -> None:
    factor = size_factor(model)
    for name, value in (("H", height), ("W", width)):
        if value % factor:
            raise UserError(f"{name}={value} must be a multiple of {factor} for this model (VAE factor "
                            f"{model.vae_scale_factor} × UNet downsampling, and 8)")


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


def build_pipeline(model: LatentDiffusion, sampler: str = "") -> StableDiffusionPipeline:
    scheduler = make_scheduler(sampler, model.scheduler_config, model.scheduler_class)
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer,
                                   unet=model.unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.inference_mode()
def generate(model: LatentDiffusion, prompts: list[str], seeds: list[int], settings: GenerationSettings,
             pipe: StableDiffusionPipeline | None = None, max_length: int | None = None,
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
    prompt_embeds = model.encode_prompts(list(prompts), max_length)
    negative = None
    if settings.guidance_scale > 1:
        # Tokenised to the prompts' length (Wukong's embeddings are n_repeat long, not one per token)
        negative = model.encode_prompts([settings.negative_prompt] * len(prompts), max_length)
    generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds]
    # Each image's initial noise, drawn in fp32 from its own generator exactly as diffusers' randn_tensor draws it for
    # a single image; the generators then go on to the sampler (ancestral samplers draw from them per step). Drawing
    # here keeps the latents (and so the scheduler arithmetic) fp32 whatever the UNet's precision.
    factor = model.vae_scale_factor
    shape = (1, model.latent_channels, height // factor, width // factor)
    from_noise = not (inputs and inputs.images)  # img2img and inpainting draw their noise in the pipeline
    if latents is None:
        if from_noise:
            latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    elif not from_noise:
        raise UserError("latents cannot be given with an input image (img2img and inpainting noise the image)")
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
    common = dict(**callback, prompt_embeds=prompt_embeds, negative_prompt_embeds=negative,
                  num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale, eta=settings.eta,
                  generator=generators, output_type="np")
    if inputs or controlnet is not None:
        output = _generate_from_images(pipe, common, settings, inputs or ImageInputs(), controlnet, height, width,
                                       None if latents is None else latents.to(model.unet.device), len(prompts))
    else:
        output = pipe(**common, height=height, width=width, guidance_rescale=settings.guidance_rescale,
                      latents=latents.to(model.unet.device))
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in output.images]


_VARIANTS = {("img2img", False): "StableDiffusionImg2ImgPipeline", ("inpaint", False): "StableDiffusionInpaintPipeline",
             ("txt2img", True): "StableDiffusionControlNetPipeline",
             ("img2img", True): "StableDiffusionControlNetImg2ImgPipeline",
             ("inpaint", True): "StableDiffusionControlNetInpaintPipeline"}


def variant(pipe: StableDiffusionPipeline, kind: str, controlnet=None):
    """diffusers' pipeline for ``kind`` (img2img, inpaint; txt2img with a ControlNet) over ``pipe``'s components,
    built once per (kind, ControlNet) and kept on ``pipe``."""
    import diffusers

    cache = pipe.__dict__.setdefault("_easynlp_variants", {})
    key = (kind, id(controlnet) if controlnet is not None else None)
    if key not in cache:
        cls = getattr(diffusers, _VARIANTS[(kind, controlnet is not None)])
        extra = {"controlnet": controlnet} if controlnet is not None else {}
        built = cls(**pipe.components, **extra)
        built.set_progress_bar_config(disable=True)
        cache[key] = built
    return cache[key]


def _generate_from_images(pipe, common: dict, settings: GenerationSettings, inputs: ImageInputs, controlnet,
                          height: int, width: int, latents: torch.Tensor, count: int):
    from appzoo.latent_diffusion.conditioning import fit

    if settings.guidance_rescale:
        raise UserError("guidance_rescale is not available with an input image, a mask or a ControlNet (diffusers' "
                        "pipelines for them do not take it); leave it at 0")
    for name, items in (("image", inputs.images), ("mask", inputs.masks)):
        if items is not None and len(items) != count:
            raise ValueError(f"one {name} per image")
    if inputs.masks and not inputs.images:
        raise UserError("a mask needs the image it applies to (inpainting repaints the mask's white part of it)")
    kind = "inpaint" if inputs.masks else "img2img" if inputs.images else "txt2img"
    kwargs = dict(common)
    if inputs.images:
        kwargs["image"] = [fit(image, width, height) for image in inputs.images]
        kwargs["strength"] = image_strength(settings.strength, bool(inputs.masks))
    if inputs.masks:
        kwargs["mask_image"] = [mask.convert("L").resize((width, height), Image.NEAREST)
                                if mask.size != (width, height) else mask.convert("L") for mask in inputs.masks]
    if kind != "img2img" or controlnet is not None:
        kwargs.update(height=height, width=width)
    if kind == "txt2img":
        kwargs["latents"] = latents  # the seeds' noise, as text-to-image draws it
    if controlnet is not None:
        if not inputs.controls or len(inputs.controls) != len(settings.controlnets):
            raise UserError(f"{len(settings.controlnets)} ControlNet(s) need a conditioning image each")
        controls = [[fit(image, width, height) for image in per_net] for per_net in inputs.controls]
        scales = [scale for _, scale in settings.controlnets]
        kwargs["image" if kind == "txt2img" else "control_image"] = controls[0] if len(controls) == 1 else controls
        kwargs["controlnet_conditioning_scale"] = scales[0] if len(scales) == 1 else scales
    elif inputs.controls:
        raise UserError("a conditioning image was given but no ControlNet: pass controlnet=FOLDER[:scale]")
    return variant(pipe, kind, controlnet)(**kwargs)


# ----------------------------------------------------------------------------------------- super-resolution
class SuperResolution:
    """The model's ESRGAN ×4, loaded once per model and shared by every ``Generator`` that asks for it."""

    def __init__(self, model: LatentDiffusion):
        if not model.esrgan_path:
            raise UserError("do_sr=True but the model has no RRDB_ESRGAN_x4.pth beside its weights; add the file to "
                            "the model folder or drop do_sr")
        from modelzoo.esrgan import load_rrdbnet

        try:
            self.net = load_rrdbnet(model.esrgan_path).to(model.unet.device)
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
    """The ControlNet (one, or diffusers' ``MultiControlNetModel`` of several) for ``specs``, loaded once per model
    and set of folders, on the UNet's device and dtype; None without specs."""
    if not specs:
        return None
    cache = model.__dict__.setdefault("_controlnets", {})
    paths = tuple(path for path, _ in specs)
    if paths not in cache:
        from appzoo.latent_diffusion.conditioning import load_controlnets

        models = load_controlnets(list(paths), model.unet.device, model.unet.dtype)
        if len(models) == 1:
            cache[paths] = models[0]
        else:
            from diffusers import MultiControlNetModel

            cache[paths] = MultiControlNetModel(models)
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
        if has_adapters(self.model.unet):
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
