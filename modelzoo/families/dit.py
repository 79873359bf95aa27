"""The flow-matching DiT families: Z-Image (a single-stream DiT, Qwen3 text encoder) and Qwen-Image (an MMDiT,
Qwen2.5-VL text encoder), sampled by their own diffusers pipelines (``ZImagePipeline``, ``QwenImagePipeline`` and
their img2img, inpainting and ControlNet variants; a ControlNet folder is the family's ``controlnet_class``).

Folders they read: diffusers folders whose ``model_index.json`` names the family's pipeline class, loaded with
diffusers' and transformers' own ``from_pretrained`` (offline, no remote code). The model (``DiTModel``) holds the
components and what the app asks of a model: device, dtype, native image size, VAE factor, scheduler config, text
length, tokenizer. What the families cannot do yet is refused with one line where a mode asks for it (the family's
``pipelines``, ``train_targets``, ``export_formats``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import torch

from modelzoo.families.base import IMG2IMG, INPAINT, TXT2IMG, ModelFamily, ModelFormatError

# Where a folder says nothing of its native size (model_index.json's ``_image_size``, or the VAE's sample_size):
# what both pipelines generate by default.
DEFAULT_IMAGE_SIZE = 1024
# max_sequence_length both pipelines tokenise prompts to by default; Qwen-Image's pipeline refuses more than 1024.
DEFAULT_TEXT_LENGTH = 512


class DiTModel(torch.nn.Module):
    """A flow-matching DiT's components as plain attributes (``transformer``, ``vae``, ``text_encoder``,
    ``tokenizer``), with the geometry its family read from the folder. ``family`` names its family."""

    esrgan_path = None  # no ×4 super-resolution net beside these models

    def __init__(self, family: str, *, transformer, vae, text_encoder, tokenizer, scheduler_config: dict,
                 image_size: int, vae_scale_factor: int, latent_channels: int, text_length_limit: int):
        super().__init__()
        self.family = family
        self.transformer, self.vae, self.text_encoder, self.tokenizer = transformer, vae, text_encoder, tokenizer
        self.scheduler_config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        self.scheduler_class = scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        self.image_size = int(image_size)
        self.vae_scale_factor = int(vae_scale_factor)
        self.latent_channels = int(latent_channels)
        self.text_length_limit = int(text_length_limit)
        self.text_max_length = min(DEFAULT_TEXT_LENGTH, self.text_length_limit)
        self.extra: dict[str, Any] = {}

    def clamp_text_length(self, requested: int | None) -> int:
        """Tokens per prompt: ``requested`` (``--sequence_length``) or the pipeline's default, never past what the
        text encoder (or the pipeline) takes."""
        return self.text_max_length if requested is None else min(int(requested), self.text_length_limit)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype


def _read_index(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


@contextlib.contextmanager
def _quiet_loading():
    """diffusers' and transformers' progress bars off while a model loads (the app logs what it loads)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [(module, module.is_progress_bar_enabled()) for module in (diffusers_logging, transformers_logging)]
    for module, _ in enabled:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was in enabled:
            if was:
                module.enable_progress_bar()


class DiTFamily(ModelFamily):
    """What Z-Image and Qwen-Image share: loading through their diffusers pipeline class, the flow-matching scheduler
    of the folder, prompt strings handed to the pipeline (which templates and encodes them itself), and the
    settings that belong to SD-1.x's samplers refused."""

    denoiser = "transformer"
    folder_classes: tuple[str, ...] = ()  # model_index.json ``_class_name``s of this family's folders
    own_guidance = ""  # the family's own guidance settings, named where SD-1.x's are refused
    # Qwen-Image's ControlNet pipeline samples the conditioning image's latents from the seed's generator before the
    # noise: the pipelines draw the noise themselves, so a seed gives diffusers' image.
    controlnet_takes_latents = False
    openvino_parts = ()
    train_targets = ()
    export_formats = ()

    # ------------------------------------------------------------------------------------------- loading
    def recognises(self, folder: str) -> bool:
        return _read_index(folder).get("_class_name") in self.folder_classes

    def load(self, folder: str, dtype=None) -> DiTModel:
        index = _read_index(folder)
        if index.get("_class_name") not in self.folder_classes:
            raise ModelFormatError(f"{folder}: not a {self.name} model (model_index.json names none of "
                                   f"{', '.join(self.folder_classes)})")
        options = {"torch_dtype": dtype} if dtype is not None else {}
        try:
            with _quiet_loading():
                pipe = self.pipeline_class(index["_class_name"]).from_pretrained(folder, local_files_only=True,
                                                                                 **options)
        except (OSError, ValueError, KeyError, TypeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelFormatError(f"{folder}: cannot load this {self.name} model ({reason})") from None
        model = DiTModel(self.name, transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                         tokenizer=pipe.tokenizer, scheduler_config=dict(pipe.scheduler.config),
                         image_size=index.get("_image_size") or self.native_size(pipe),
                         vae_scale_factor=pipe.vae_scale_factor, latent_channels=self.latent_channels(pipe),
                         text_length_limit=self.text_length_limit(pipe))
        model.source_path = os.path.abspath(folder)
        return model.eval()

    def native_size(self, pipe) -> int:
        return DEFAULT_IMAGE_SIZE

    def latent_channels(self, pipe) -> int:
        raise NotImplementedError

    def text_length_limit(self, pipe) -> int:
        raise NotImplementedError

    def save(self, model, folder: str, **options) -> list[str]:
        raise ModelFormatError(f"{self.name} models cannot be saved by this toolkit yet")

    # ---------------------------------------------------------------------------------------- generation
    def scheduler(self, model: DiTModel, sampler: str = ""):
        if sampler:
            raise ValueError(f"{self.name} models sample with their own flow-matching scheduler only (no sampler= "
                             f"yet)")
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)

    def pipeline_components(self, model: DiTModel, scheduler) -> dict[str, Any]:
        return dict(transformer=model.transformer, vae=model.vae, text_encoder=model.text_encoder,
                    tokenizer=model.tokenizer, scheduler=scheduler if scheduler is not None else self.scheduler(model))

    def encode_prompts(self, model, prompts: list[str], max_length: int | None = None):
        raise NotImplementedError(f"{self.name} pipelines encode their prompts themselves")

    def size_factor(self, model: DiTModel) -> int:
        """The VAE factor × the transformer's 2×2 patches (both pipelines' rule), and 8."""
        return math.lcm(8, model.vae_scale_factor * 2)

    def sampling_problem(self, settings) -> str | None:
        given = [f"{name}={value:g}" for name, value, off in (
            ("guidance_rescale", settings.guidance_rescale, 0.0), ("guidance_cutoff", settings.guidance_cutoff, 1.0))
            if value != off]
        if given:
            return (f"{', '.join(given)}: SD-1.x's guidance settings do not apply to {self.name} models; "
                    f"{self.own_guidance}")
        return None

    def pipeline_arguments(self, model: DiTModel, prompts: list[str], generators, settings,
                           max_length: int | None = None) -> dict[str, Any]:
        return dict(prompt=list(prompts), num_inference_steps=settings.steps, generator=generators,
                    output_type="np", max_sequence_length=max_length or model.text_max_length)

    def txt2img_arguments(self, model: DiTModel, settings, height: int, width: int, latents) -> dict[str, Any]:
        return dict(height=height, width=width, latents=self.initial_latents(latents))

    def initial_latents(self, latents):
        """The seeds' noise (N, C, h, w) as the family's pipelines take ``latents``."""
        return latents

    def image_arguments(self, model, kind, *, images, masks, controls, control_scales, strength, height, width,
                        latents):
        """The size always (img2img too: these pipelines otherwise generate their default size, not the image's),
        the conditioning images as ``control_image`` (these ControlNet pipelines' name), no ``latents``
        (``controlnet_takes_latents``)."""
        arguments = dict(height=height, width=width)
        if images:
            arguments.update(image=images, strength=strength)
        if masks:
            arguments["mask_image"] = masks
        if controls is not None:
            arguments.update(control_image=controls, controlnet_conditioning_scale=control_scales)
        return arguments


class ZImageFamily(DiTFamily):
    name = "zimage"
    folder_classes = ("ZImagePipeline",)
    pipelines = {(TXT2IMG, False): "ZImagePipeline", (IMG2IMG, False): "ZImageImg2ImgPipeline",
                 (INPAINT, False): "ZImageInpaintPipeline", (TXT2IMG, True): "ZImageControlNetPipeline"}
    controlnet_class = "ZImageControlNetModel"
    multi_controlnet_class = ""  # ZImageControlNetPipeline runs one ControlNet
    own_guidance = "Z-Image's are cfg_truncation and cfg_normalization"
    own_settings = ("cfg_normalization", "cfg_truncation")

    def native_size(self, pipe) -> int:
        return int(getattr(pipe.vae.config, "sample_size", 0) or DEFAULT_IMAGE_SIZE)

    def latent_channels(self, pipe) -> int:
        return int(pipe.transformer.config.in_channels)

    def text_length_limit(self, pipe) -> int:
        return int(pipe.text_encoder.config.max_position_embeddings)

    def pipeline_arguments(self, model, prompts, generators, settings, max_length=None):
        """Z-Image's guidance runs with ``scale`` > 0 (its pipeline's rule: pos + scale × (pos - neg));
        ``cfg_truncation`` and ``cfg_normalization`` as its pipeline takes them."""
        return dict(super().pipeline_arguments(model, prompts, generators, settings, max_length),
                    negative_prompt=[settings.negative_prompt] * len(prompts), guidance_scale=settings.guidance_scale,
                    cfg_normalization=settings.cfg_normalization, cfg_truncation=settings.cfg_truncation)


class QwenImageFamily(DiTFamily):
    name = "qwenimage"
    folder_classes = ("QwenImagePipeline",)
    pipelines = {(TXT2IMG, False): "QwenImagePipeline", (IMG2IMG, False): "QwenImageImg2ImgPipeline",
                 (INPAINT, False): "QwenImageInpaintPipeline", (TXT2IMG, True): "QwenImageControlNetPipeline"}
    controlnet_class = "QwenImageControlNetModel"
    multi_controlnet_class = "QwenImageMultiControlNetModel"
    own_guidance = "Qwen-Image's is true_cfg_scale"
    own_settings = ("true_cfg_scale",)

    def latent_channels(self, pipe) -> int:
        return int(pipe.transformer.config.in_channels) // 4

    def text_length_limit(self, pipe) -> int:
        return int(pipe.tokenizer_max_length)

    def pipeline_arguments(self, model, prompts, generators, settings, max_length=None):
        """Classifier-free guidance is ``true_cfg_scale`` (> 1: with the negative prompt, empty or not); ``scale`` is
        the guidance input of a guidance-distilled transformer, and not passed to one that has none."""
        guided = settings.true_cfg_scale > 1
        distilled = bool(model.transformer.config.guidance_embeds)
        return dict(super().pipeline_arguments(model, prompts, generators, settings, max_length),
                    negative_prompt=[settings.negative_prompt] * len(prompts) if guided else None,
                    true_cfg_scale=settings.true_cfg_scale,
                    guidance_scale=settings.guidance_scale if distilled else None)

    def initial_latents(self, latents):
        """The seeds' noise, drawn per image as the pipeline draws it, packed into its 2×2 patches."""
        count, channels, rows, columns = latents.shape
        return self.pipeline_class(self.pipelines[TXT2IMG, False])._pack_latents(
            latents, count, channels, rows, columns)


ZIMAGE = ZImageFamily()
QWENIMAGE = QwenImageFamily()
