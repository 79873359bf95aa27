"""The SD-1.x family: a diffusers ``UNet2DConditionModel`` denoising ``AutoencoderKL`` latents, conditioned by a
Chinese CLIP, BERT or Wukong text encoder (``modelzoo.ldm.LatentDiffusion``); epsilon or v-prediction under a DDPM
noise schedule; diffusers' Stable Diffusion pipelines for text-to-image, img2img, inpainting and ControlNet.

Folders it reads: PAI's diffusers layout, this toolkit's checkpoint and EasyNLP's own latent_diffusion checkpoint
(``modelzoo.formats.easynlp``); a model read from one of the checkpoint formats is saved in it again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from easynlp_ldm.files import WeightsError
from modelzoo import ldm
from modelzoo.families.base import IMG2IMG, INPAINT, TXT2IMG, ModelFamily, ModelFormatError
from modelzoo.formats import easynlp

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_text_to_image_lora.py
FEED_FORWARD_TARGETS = ("ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class SDFamily(ModelFamily):
    name = "sd"
    denoiser = "unet"
    formats = (ldm.FORMAT_NAME, easynlp.FORMAT)
    export_formats = ("tar", "diffusers", "easynlp")
    pipelines = {(TXT2IMG, False): "StableDiffusionPipeline",
                 (IMG2IMG, False): "StableDiffusionImg2ImgPipeline",
                 (INPAINT, False): "StableDiffusionInpaintPipeline",
                 (TXT2IMG, True): "StableDiffusionControlNetPipeline",
                 (IMG2IMG, True): "StableDiffusionControlNetImg2ImgPipeline",
                 (INPAINT, True): "StableDiffusionControlNetInpaintPipeline"}
    lora_targets = {"attention": ATTENTION_TARGETS, "ff": FEED_FORWARD_TARGETS}
    text_encoder_lora_targets = TEXT_ENCODER_TARGETS
    openvino_parts = ("unet", "vae_decoder")
    train_targets = ("unet", "vae", "vae_decoder", "rrdb", "lora", "controlnet")

    def recognises(self, folder: str) -> bool:
        return os.path.isdir(folder) and (easynlp.is_easynlp_checkpoint(folder) or ldm.is_own_checkpoint(folder)
                                          or ldm.is_diffusers_layout(folder))

    def load(self, folder: str, dtype=None) -> ldm.LatentDiffusion:
        if not os.path.isdir(folder):
            raise ModelFormatError(f"{folder}: not a folder")
        try:
            if easynlp.is_easynlp_checkpoint(folder):
                model = easynlp.load(folder)
            elif ldm.is_own_checkpoint(folder):
                model = ldm.load_checkpoint(folder)
            elif ldm.is_diffusers_layout(folder):
                model = ldm.load_diffusers_layout(folder)
            else:
                raise ModelFormatError(f"{folder}: neither a diffusers-layout model (model_index.json, unet/, vae/, "
                                       f"text_encoder/, tokenizer/) nor an easynlp-ldm or EasyNLP checkpoint "
                                       f"(config.json + pytorch_model.bin + vocab.txt)")
        except WeightsError as err:
            raise ModelFormatError(str(err)) from None
        model.source_path = os.path.abspath(folder)
        if dtype is not None:
            model.to(dtype)
        return model.eval()

    def save(self, model: ldm.LatentDiffusion, folder: str, *, overrides: Mapping[str, Any] | None = None,
             dtype=None, format: str | None = None) -> list[str]:
        """Each file is replaced atomically, weights last: a reader never sees a half-written file, and config/vocab
        never change during a training run. ``format``: ``easynlp-ldm`` (this toolkit's) or ``easynlp`` (EasyNLP's
        own); default: the format the model was read from (this toolkit's for a diffusers-layout model)."""
        format = format or model.extra.get("source_format") or ldm.FORMAT_NAME
        if format == easynlp.FORMAT:
            return easynlp.save(model, folder, overrides, dtype)
        if format != ldm.FORMAT_NAME:
            raise ValueError(f"unknown checkpoint format {format!r} ({', '.join(self.formats)})")
        return ldm.save_checkpoint(model, folder, overrides, dtype)

    def scheduler(self, model: ldm.LatentDiffusion, sampler: str = ""):
        from modelzoo.samplers import make_scheduler

        return make_scheduler(sampler, model.scheduler_config, model.scheduler_class)

    def objective(self, model: ldm.LatentDiffusion, snr_gamma: float = 0.0, high_noise_loss: str = "epsilon"):
        from modelzoo.objectives import DiffusionObjective

        return DiffusionObjective(model, snr_gamma, high_noise_loss)

    def memory_footprint(self, model: ldm.LatentDiffusion, **settings):
        from modelzoo.families.sd_memory import latent_diffusion_footprint

        return latent_diffusion_footprint(model, **settings)

    def pipeline_components(self, model: ldm.LatentDiffusion, scheduler) -> dict[str, Any]:
        return dict(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
                    scheduler=scheduler if scheduler is not None else self.scheduler(model), safety_checker=None,
                    feature_extractor=None, requires_safety_checker=False)


FAMILY = SDFamily()


def load(folder: str, dtype=None) -> ldm.LatentDiffusion:
    return FAMILY.load(folder, dtype)


def save(model: ldm.LatentDiffusion, folder: str, **options) -> list[str]:
    return FAMILY.save(model, folder, **options)
