"""The test suite's second model family, "toy-flow": SD-1.x's components (a tiny UNet, VAE, CLIP text encoder)
trained and sampled by rectified flow matching (as SD3, Flux and Z-Image are), with a pipeline class of its own.

It proves the seam (modelzoo/families/base.py): this module is the whole family, and tests/conftest.py registers it
in one line. Folders it claims: a diffusers layout whose ``model_index.json`` names ``ToyFlowPipeline``, or this
toolkit's checkpoint whose config records ``"extra": {"family": "toy-flow"}`` (what its ``save`` writes).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput

from modelzoo import ldm
from modelzoo.families.base import TXT2IMG, ModelFormatError
from modelzoo.families.sd import SDFamily

NAME = "toy-flow"
PIPELINE = "ToyFlowPipeline"


class ToyFlowPipeline(DiffusionPipeline):
    """Euler steps of the flow from noise (sigma 1) to the image latents (sigma 0), with classifier-free guidance;
    takes the arguments the app's generation passes to a diffusers text-to-image pipeline."""

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, prompt_embeds, negative_prompt_embeds=None, num_inference_steps=4, guidance_scale=1.0,
                 latents=None, generator=None, output_type="np", callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=(), **unused):
        self._guidance_scale = guidance_scale
        self.scheduler.set_timesteps(num_inference_steps, device=latents.device)
        self.num_timesteps = len(self.scheduler.timesteps)
        for index, t in enumerate(self.scheduler.timesteps):
            guided = negative_prompt_embeds is not None and self._guidance_scale > 1
            embeds = torch.cat([negative_prompt_embeds, prompt_embeds]) if guided else prompt_embeds
            inputs = torch.cat([latents] * 2) if guided else latents
            velocity = self.unet(inputs.to(self.unet.dtype), t, encoder_hidden_states=embeds).sample.float()
            if guided:
                uncond, cond = velocity.chunk(2)
                velocity = uncond + self._guidance_scale * (cond - uncond)
            latents = self.scheduler.step(velocity, t, latents).prev_sample
            if callback_on_step_end is not None:
                prompt_embeds = callback_on_step_end(self, index, t, {"prompt_embeds": prompt_embeds})["prompt_embeds"]
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        image = (image.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        return ImagePipelineOutput(images=np.asarray(image))


class FlowMatchingObjective:
    """Rectified flow: noisy = (1 - sigma) · latents + sigma · noise, the denoiser predicts noise - latents; sigma of
    an integer timestep t is (t + 1) / num_timesteps. ``calls`` counts the losses computed (for the tests)."""

    calls = 0

    def __init__(self, model, **unused):
        self.model = model
        self.num_timesteps = int(model.scheduler_config.get("num_train_timesteps", 1000))

    def per_sample_loss(self, latents, noise, timesteps, embeds, min_snr=True, residuals=None):
        FlowMatchingObjective.calls += 1
        sigma = ((timesteps.float() + 1) / self.num_timesteps).view(-1, 1, 1, 1).to(latents.device)
        noisy = (1 - sigma) * latents + sigma * noise
        extra = residuals(noisy, timesteps, embeds) if residuals is not None else {}
        velocity = self.model.unet(noisy, sigma.flatten() * self.num_timesteps, encoder_hidden_states=embeds,
                                   **extra).sample
        return F.mse_loss(velocity.float(), (noise - latents).float(), reduction="none").mean(dim=(1, 2, 3))

    def loss(self, latents, noise, timesteps, embeds, high=None, high_share=0.0, residuals=None):
        return self.per_sample_loss(latents, noise, timesteps, embeds, residuals=residuals).mean()


class ToyFlowFamily(SDFamily):
    name = NAME
    formats = (ldm.FORMAT_NAME,)
    export_formats = ("tar",)
    pipelines = {(TXT2IMG, False): PIPELINE}
    openvino_parts = ()
    train_targets = ("unet", "lora")

    def recognises(self, folder: str) -> bool:
        index = _read(os.path.join(folder, "model_index.json"))
        config = _read(os.path.join(folder, ldm.CONFIG_NAME))
        return index.get("_class_name") == PIPELINE or (config.get("extra") or {}).get("family") == NAME

    def load(self, folder: str, dtype=None):
        if not self.recognises(folder):
            raise ModelFormatError(f"{folder}: not a {NAME} model")
        model = (ldm.load_checkpoint if ldm.is_own_checkpoint(folder) else ldm.load_diffusers_layout)(folder)
        model.family = NAME
        model.extra["family"] = NAME
        model.source_path = os.path.abspath(folder)
        if dtype is not None:
            model.to(dtype)
        return model.eval()

    def save(self, model, folder: str, *, overrides=None, dtype=None, format=None) -> list[str]:
        return ldm.save_checkpoint(model, folder, overrides, dtype)

    def scheduler(self, model, sampler: str = ""):
        if sampler:
            raise ValueError(f"{NAME} models sample with their own flow-matching scheduler only")
        return FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)

    def pipeline_class(self, name: str):
        return ToyFlowPipeline if name == PIPELINE else super().pipeline_class(name)

    def pipeline_components(self, model, scheduler):
        return dict(vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
                    scheduler=scheduler if scheduler is not None else self.scheduler(model))

    def objective(self, model, **settings):
        return FlowMatchingObjective(model, **settings)


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


def make_toy_flow_model(folder: str) -> str:
    """A tiny toy-flow model in the diffusers layout: the tiny SD-1.x folder with a flow-matching scheduler and
    ``ToyFlowPipeline`` as its pipeline class."""
    from modelzoo.tiny import make_tiny_diffusers_model

    make_tiny_diffusers_model(folder, image_size=32)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(
        os.path.join(folder, "scheduler"))
    index_path = os.path.join(folder, "model_index.json")
    index = _read(index_path)
    index.update({"_class_name": PIPELINE, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]})
    for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
        index.pop(key, None)
    with open(index_path, "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=2)
    return folder


FAMILY = ToyFlowFamily()
