"""What a model family is to the toolkit: the one seam between the application's modes and the models.

A family says what its models are made of and how each mode uses them: which folders it reads and how (``recognises``,
``load``, ``save`` and its formats), how a prompt becomes the denoiser's conditioning (``encode_prompts``), what
training optimises (``objective``), which diffusers pipeline runs each kind of generation (``pipeline``), where LoRA
adapters go (``lora_targets``), what the memory plan counts (``memory_footprint``), what OpenVINO converts
(``openvino_parts``) and what ``--mode=export`` can write (``export_formats``). The application asks the family of a
model (``modelzoo.families.family_of``) instead of deciding any of these itself.

Adding a family is one module implementing this class and one registration (``modelzoo.families.register``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Kinds of generation a family's pipelines may run; a family maps the ones it supports to diffusers pipeline classes.
TXT2IMG, IMG2IMG, INPAINT = "txt2img", "img2img", "inpaint"


class ModelFormatError(ValueError):
    """A model folder that cannot be loaded; the message names the folder and what is wrong."""


class ModelFamily:
    """One family of models. Subclasses set the class attributes and implement the methods that raise
    ``NotImplementedError``; the others have defaults that mean "this family does not support it"."""

    name: str = ""
    # The module that denoises (an attribute of the family's models): ``unet`` or ``transformer``.
    denoiser: str = "unet"
    # Checkpoint formats ``save`` writes, the first the family's own; ``export_formats``: what --mode=export offers.
    formats: tuple[str, ...] = ()
    export_formats: tuple[str, ...] = ()
    # Key layouts of other tools that --mode=export lora_format= converts the family's LoRA files to.
    lora_export_formats: tuple[str, ...] = ()
    # (kind, with a ControlNet) → the name of the diffusers pipeline class that runs it.
    pipelines: Mapping[tuple[str, bool], str] = {}
    # diffusers' class of the family's ControlNet folders, and the class that runs several at once ("": one only).
    controlnet_class: str = "ControlNetModel"
    multi_controlnet_class: str = "MultiControlNetModel"
    # Whether the ControlNet text-to-image pipeline takes the seeds' noise as ``latents`` (drawn before it runs);
    # False: it draws the noise from the seeds' generators itself, after what encoding the conditioning image draws.
    controlnet_takes_latents: bool = True
    # GenerationSettings fields only this family's pipelines take (its own guidance settings).
    own_settings: tuple[str, ...] = ()
    # Named groups of the denoiser's LoRA target modules (``lora_target_modules``), and the text encoder's targets.
    lora_targets: Mapping[str, tuple[str, ...]] = {}
    text_encoder_lora_targets: tuple[str, ...] = ()
    # What OpenVINO converts for optimize=auto on a CPU (empty: the family runs eagerly in PyTorch).
    openvino_parts: tuple[str, ...] = ()
    # What ``train_target`` may name for this family's models.
    train_targets: tuple[str, ...] = ()
    # Training encodes each caption once into a cache (``encode_texts``) and the denoiser is trained on the family's
    # flow-matching objective from it; otherwise captions are tokenised and encoded at every step (SD-1.x's way).
    caches_text_embeddings: bool = False

    # The module lists (and single blocks) of a trained module that sharded training splits it into, by attribute
    # name: diffusers' UNet and transformer blocks, the text encoders' layers.
    shard_block_lists: tuple[str, ...] = ("down_blocks", "up_blocks", "transformer_blocks",
                                          "single_transformer_blocks", "layers", "layer", "blocks", "noise_refiner",
                                          "context_refiner")
    shard_blocks: tuple[str, ...] = ("mid_block",)

    # ------------------------------------------------------------------------------------------- loading
    def recognises(self, folder: str) -> bool:
        """Whether ``folder`` holds a model of this family (cheap: file names and small configs only)."""
        raise NotImplementedError

    def load(self, folder: str, dtype=None):
        """The model in ``folder``, in eval mode, with ``source_path`` set."""
        raise NotImplementedError

    def save(self, model, folder: str, *, overrides: Mapping[str, Any] | None = None, dtype=None,
             format: str | None = None) -> list[str]:
        """Write ``model`` (weights replaced by ``overrides``, e.g. EMA ones) to ``folder`` atomically; returns the
        files written. ``format``: one of ``formats`` (default: the format the model was read from)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- generation
    def encode_prompts(self, model, prompts: list[str], max_length: int | None = None):
        """Prompts → the denoiser's conditioning (``prompt_embeds`` of the family's pipelines)."""
        return model.encode_prompts(prompts, max_length)

    def scheduler(self, model, sampler: str = ""):
        """The sampling scheduler for ``sampler`` (empty: the model's own)."""
        raise NotImplementedError

    def sampler_names(self) -> list[str]:
        """The ``sampler=`` short names ``scheduler`` takes (SD-style: modelzoo/samplers.py's table)."""
        from modelzoo.samplers import sampler_names

        return sampler_names()

    def generation_defaults(self, model) -> tuple[dict[str, Any], str]:
        """Sampling settings the model's folder asks for where the user gives none (``GenerationSettings`` field →
        value: ``steps``, ``guidance_scale``, ``true_cfg_scale``), and where they come from, for the log; none by
        default (SD-1.x: the global defaults)."""
        return {}, ""

    def pipeline(self, model, kind: str = TXT2IMG, controlnet=None, scheduler=None, base=None):
        """diffusers' pipeline for ``kind`` over ``model``'s components (``base``: a pipeline of this model whose
        components are reused)."""
        name = self.pipelines.get((kind, controlnet is not None))
        if name is None:
            what = f"{kind} with a ControlNet" if controlnet is not None else kind
            raise ValueError(f"{self.name} models cannot run {what}")
        cls = self.pipeline_class(name)
        extra = {"controlnet": controlnet} if controlnet is not None else {}
        if base is not None:
            return cls(**base.components, **extra)
        return cls(**self.pipeline_components(model, scheduler), **extra)

    def controlnet_kinds(self, model, controlnet) -> tuple[str, ...]:
        """The kinds ``controlnet`` (one of the family's ControlNets, or several) can condition: by default every
        kind the family has a ControlNet pipeline for (an inpainting ControlNet of a DiT family: inpainting only)."""
        return tuple(kind for kind, with_controlnet in self.pipelines if with_controlnet)

    def pipeline_class(self, name: str):
        """diffusers' pipeline class ``name``. diffusers' pipeline modules import transformers' CLIP image processor
        (for a safety checker never used here), which without torchvision warns on every command: that line says
        nothing to our users, so transformers is quiet meanwhile."""
        from transformers.utils import logging as transformers_logging

        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()
        try:
            import diffusers

            return getattr(diffusers, name)
        finally:
            transformers_logging.set_verbosity(verbosity)

    def pipeline_components(self, model, scheduler) -> dict[str, Any]:
        raise NotImplementedError

    def pipeline_arguments(self, model, prompts: list[str], generators, settings,
                           max_length: int | None = None) -> dict[str, Any]:
        """The arguments of every call of the family's pipelines for ``prompts`` (one seeded generator per image)
        with the sampling ``settings`` (a ``GenerationSettings``). This default is SD-style pipelines': prompt
        embeddings, the negative prompt's when guidance runs (scale > 1, as diffusers decides), DDIM's eta."""
        prompt_embeds = self.encode_prompts(model, list(prompts), max_length)
        negative = None
        if settings.guidance_scale > 1:
            # Tokenised to the prompts' length (Wukong's embeddings are n_repeat long, not one per token)
            negative = self.encode_prompts(model, [settings.negative_prompt] * len(prompts), max_length)
        return dict(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative, num_inference_steps=settings.steps,
                    guidance_scale=settings.guidance_scale, eta=settings.eta, generator=generators, output_type="np")

    def txt2img_arguments(self, model, settings, height: int, width: int, latents) -> dict[str, Any]:
        """What the text-to-image pipeline takes besides ``pipeline_arguments``: the size and the seeds' initial noise
        (``latents``: one (channels, height, width) tensor per image, as the SD pipelines take them)."""
        return dict(height=height, width=width, guidance_rescale=settings.guidance_rescale, latents=latents)

    def image_arguments(self, model, kind: str, *, images, masks, controls, control_scales, strength: float,
                        height: int, width: int, latents) -> dict[str, Any]:
        """What the pipeline for ``kind`` takes besides ``pipeline_arguments`` when generating from images: the init
        ``images`` and ``masks`` (fitted to the size; None without), the ControlNets' conditioning images
        (``controls``: as the pipeline takes them, None without a ControlNet) and ``control_scales``, the img2img /
        inpainting ``strength``, and for text-to-image the seeds' noise (``latents``, as ``txt2img_arguments`` takes
        them). This default is SD-style pipelines': img2img's size is its image's, and a ControlNet's conditioning
        image is ``image`` when there is no init image."""
        arguments = {}
        if images:
            arguments.update(image=images, strength=strength)
        if masks:
            arguments["mask_image"] = masks
        if kind != IMG2IMG or controls is not None:
            arguments.update(height=height, width=width)
        if kind == TXT2IMG:
            arguments["latents"] = latents
        if controls is not None:
            arguments["image" if kind == TXT2IMG else "control_image"] = controls
            arguments["controlnet_conditioning_scale"] = control_scales
        return arguments

    def takes_strength(self, kind: str, controlnet: bool) -> bool:
        """Whether the pipeline for ``kind`` (img2img or inpaint, with a ControlNet or not) takes ``strength``, so
        ``strength`` × steps must redraw a step; SD-style pipelines all do."""
        return True

    def sampling_problem(self, settings, model) -> str | None:
        """Why the sampling ``settings`` cannot apply to ``model`` of this family (one line), or None."""
        return None

    def size_factor(self, model) -> int:
        """Image sizes must be multiples of this: the VAE factor × the UNet's downsampling, and 8 (diffusers')."""
        return math.lcm(8, model.vae_scale_factor * 2 ** (len(model.unet.config.block_out_channels) - 1))

    # ------------------------------------------------------------------------------------------ training
    def objective(self, model, **options):
        """What training optimises for ``model`` (``options``: the training settings that shape the loss)."""
        raise NotImplementedError

    def vae_moments(self, model, pixels):
        """Images in [-1, 1] (N, 3, H, W) → the VAE posterior's (mean, logvar) stacked on the channels."""
        return model.vae.encode(pixels).latent_dist.parameters

    def memory_footprint(self, model, **settings):
        """What the memory plan counts for training ``model`` (an ``easynlp_ldm.memory.ModelFootprint``)."""
        raise NotImplementedError

    def shard_units(self, module) -> list:
        """The blocks of ``module`` (a trained UNet, transformer or text encoder) that sharded training shards one
        by one: the members of its outermost ``shard_block_lists`` and its ``shard_blocks``, in module order (one
        inside another is part of it, not a unit of its own)."""
        units, taken = [], []
        for name, child in module.named_modules():
            if any(name.startswith(prefix) for prefix in taken):
                continue
            attribute = name.rpartition(".")[2]
            if attribute in self.shard_block_lists and hasattr(child, "__iter__"):
                units.extend(child)
            elif attribute in self.shard_blocks:
                units.append(child)
            else:
                continue
            taken.append(name + ".")
        return units
