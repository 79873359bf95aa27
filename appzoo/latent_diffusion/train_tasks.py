"""What ``--mode=train`` can train, each as a ``TrainTask`` for the framework trainer (optimiser, EMA, checkpoints,
resume, logs): the diffusion model (``train_target=unet``: UNet, optionally the text encoder; ``transformer``:
a flow-matching DiT's transformer, its captions from a text-embedding cache), the autoencoder
(``vae``, or only its decoder with ``vae_decoder``) and the ESRGAN ×4 net (``rrdb``). Per-sample randomness is seeded
by (seed, epoch, index) everywhere."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from appzoo.latent_diffusion.data import (
    CONTROL_COLUMN,
    PIXEL_STAGE,
    TRAIN_STAGE,
    IndexedTable,
    PixelReader,
    TrainingData,
    encoded_captions,
    preprocess_image,
    sample_generator,
)
from appzoo.latent_diffusion.generation import build_pipeline, generate
from appzoo.latent_diffusion.settings import GenerationSettings, TrainingSettings
from easynlp_ldm.errors import UserError
from modelzoo import families, lowbit
from modelzoo.ldm import ESRGAN_NAME, LatentDiffusion
from modelzoo.objectives import fixed_noise_flow_loss, fixed_noise_loss, sample_latents

logger = logging.getLogger("easynlp.train")

SCALING_SAMPLE = 256  # images used to set the VAE's latent scaling factor (1 / std of the latents)
VALIDATION_ROWS = 256


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module):
    """``module`` in eval mode for the block (a validation pass, sample images), then back in the mode it was in."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class DiffusionTrainTask:
    """The diffusion objective on ``data`` (``TrainingData``): each training image at its size (its aspect-ratio
    bucket; without sizes the square ``resolution`` for all), micro-batches from one size each (``groups``); the
    cached VAE latents' moments per image, or (without them) images read and encoded at every step. The UNet's
    extra inputs of a batch come from the ``unet_residuals`` hook (a ControlNet's, in ``ControlNetTrainTask``)."""

    def __init__(self, model: LatentDiffusion, settings: TrainingSettings, data: TrainingData, *, seed: int,
                 resolution: int, text_length: int, use_amp: bool = False):
        self._take_data(model, settings, data, seed, resolution, text_length)
        self.objective = families.family_of(model).objective(model, snr_gamma=settings.snr_gamma,
                                                             high_noise_loss=settings.high_noise_loss)
        self.num_timesteps = self.objective.num_timesteps
        if settings.high_noise_share and not 0 <= settings.high_noise_from < self.num_timesteps:
            raise UserError(f"high_noise_from={settings.high_noise_from}: the model's schedule has timesteps 0-"
                            f"{self.num_timesteps - 1}; give one of them")
        self.train_text_encoder = bool(settings.train_text_encoder)
        model.vae.requires_grad_(False).eval()
        model.text_encoder.requires_grad_(self.train_text_encoder)
        model.text_encoder.train(self.train_text_encoder)
        model.unet.requires_grad_(True).train()
        if use_amp and model.device.type == "cpu":
            from modelzoo.attention import Float32AttentionProcessor

            model.unet.set_attn_processor(Float32AttentionProcessor())
        if settings.gradient_checkpointing:
            model.unet.enable_gradient_checkpointing()
            if self.train_text_encoder and hasattr(model.text_encoder, "gradient_checkpointing_enable"):
                model.text_encoder.gradient_checkpointing_enable()

    def _take_data(self, model, settings: TrainingSettings, data: TrainingData, seed: int, resolution: int,
                   text_length: int) -> None:
        self.model, self.settings, self.data = model, settings, data
        self.denoiser = getattr(model, families.family_of(model).denoiser)
        self.train_table, self.train_moments, self.val_table = data.train, data.train_latents, data.val
        self.sizes = data.sizes or [(resolution, resolution)] * len(data.train)
        self.val_captions, self.val_moments = data.val_captions, data.val_moments
        self.seed, self.resolution, self.text_length = seed, resolution, text_length
        self.pixels = PixelReader(data.train, self.sizes, seed=seed, random_crop=settings.random_crop,
                                  random_flip=settings.random_flip)

    # ---------------------------------------------------------------------------------------- the protocol
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"unet": self.model.unet}
        if self.train_text_encoder:
            modules["text_encoder"] = self.model.text_encoder
        return modules

    def num_examples(self) -> int:
        return len(self.train_table)

    def groups(self) -> list[tuple[int, int]]:
        return self.sizes

    def shard_units(self) -> list[torch.nn.Module]:
        """The blocks of the trainable modules that sharding=fsdp shards one by one (the model family's)."""
        family = families.family_of(self.model)
        return [unit for module in self.trainable_modules().values() for unit in family.shard_units(module)]

    def unsharded_parameters(self) -> set[torch.nn.Parameter]:
        """base_precision=int8|fp8|nf4: the denoiser's quantised weights, which sharding=fsdp leaves whole in every
        process (torchao's tensors cannot be split); its bf16 rest and the trained parameters are sharded."""
        if self.settings.base_precision not in lowbit.LOW_BIT:
            return set()
        return lowbit.quantised_parameters(self.denoiser)

    def latent_shape(self, index: int) -> tuple[int, int, int]:
        factor = self.model.vae_scale_factor
        width, height = self.sizes[index]
        return self.model.latent_channels, height // factor, width // factor

    def _draws(self, indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        dropout, timesteps, noise, eps, offsets, high = [], [], [], [], [], []
        channels = self.model.latent_channels
        share = self.settings.high_noise_share
        for index in indices:
            shape = self.latent_shape(index)
            g = sample_generator(self.seed, epoch, index, TRAIN_STAGE)
            dropout.append(float(torch.rand(1, generator=g)) < self.settings.caption_dropout)
            timesteps.append(self._timestep(g))
            noise.append(torch.randn(shape, generator=g))
            eps.append(torch.randn(shape, generator=g))
            offsets.append(torch.randn((channels, 1, 1), generator=g))
            # drawn last, and only when asked for: the other draws (and runs without the option) stay as they were
            high.append(bool(share) and float(torch.rand(1, generator=g)) < share)
            if high[-1]:
                timesteps[-1] = int(torch.randint(self.settings.high_noise_from, self.num_timesteps, (1,),
                                                  generator=g))
        return {"dropout": dropout, "timesteps": torch.tensor(timesteps, dtype=torch.long),
                "noise": torch.stack(noise), "eps": torch.stack(eps), "offsets": torch.stack(offsets),
                "high": torch.tensor(high, dtype=torch.bool)}

    def _timestep(self, g: torch.Generator) -> int:
        return int(torch.randint(0, self.num_timesteps, (1,), generator=g))

    def _text_inputs(self, captions: list[str]) -> dict[str, Any]:
        return {"input_ids": self.model.tokenize(captions, self.text_length)}

    def batches(self, order: list[list[int]], epoch: int):
        pixel_iter = self.pixels.batches(order, epoch, self.data.data_threads) if self.train_moments is None else None
        for indices in order:
            captions = [self.train_table.captions[i] for i in indices]
            draws = self._draws(indices, epoch)
            captions = ["" if drop else caption for drop, caption in zip(draws["dropout"], captions)]
            batch = {**self._text_inputs(captions), **draws}
            if self.train_moments is not None:
                batch["moments"] = self.train_moments.batch(indices)
            else:
                batch["pixels"] = next(pixel_iter)
            yield batch

    def _latents(self, batch: dict) -> torch.Tensor:
        vae = self.model.vae
        if "moments" in batch:
            mean, logvar = torch.chunk(batch["moments"].to(vae.device), 2, dim=1)
        else:
            with torch.no_grad():
                dist = vae.encode(batch["pixels"].to(vae.device, vae.dtype)).latent_dist
            mean, logvar = dist.mean.float(), dist.logvar.float()
        return sample_latents(mean, logvar, batch["eps"], self.model.vae_scaling_factor)

    def loss(self, batch: dict) -> torch.Tensor:
        latents = self._latents(batch)
        noise = batch["noise"]
        if self.settings.noise_offset:
            noise = noise + self.settings.noise_offset * batch["offsets"]
        device = self.model.device
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_text_encoder):
            embeds = self.model.encode_tokens(batch["input_ids"])
        return self.objective.loss(latents.to(device), noise.to(device), batch["timesteps"].to(device), embeds,
                                   high=batch["high"], high_share=self.settings.high_noise_share,
                                   residuals=self.unet_residuals(batch))

    def unet_residuals(self, batch: dict):
        """The UNet's extra inputs for ``batch``, as ``residuals(noisy, timesteps, embeds)`` → keyword arguments of
        the UNet (see ``DiffusionObjective.per_sample_loss``), or None: the plain diffusion objective has none."""
        return None

    def _quantise_frozen_denoiser(self) -> None:
        """base_precision=int8|fp8|nf4 (a LoRA or ControlNet run): the frozen denoiser's linear and convolution
        weights quantised in place (modelzoo/lowbit.py)."""
        precision = self.settings.base_precision
        lowbit.check_supported(precision, self.model.device)
        before = lowbit.tensor_bytes(self.denoiser)
        count = lowbit.quantise_frozen(self.denoiser.requires_grad_(False), precision)
        logger.info("base_precision=%s: %d weights of the %s quantised (%.1f MiB → %.1f MiB)", precision, count,
                    families.family_of(self.model).denoiser, before / 2**20, lowbit.tensor_bytes(self.denoiser) / 2**20)

    def validate(self) -> float | None:
        if not self.val_captions:
            return None
        with eval_mode(self.denoiser):
            return fixed_noise_loss(self.model, self.val_captions, self.val_moments, self.text_length)

    def save_model(self, folder: str, weights: dict[str, torch.Tensor]) -> list[str]:
        return families.save(self.model, folder, overrides=weights)

    def sample_images(self, count: int) -> list[tuple[str, Any]]:
        captions = self.val_captions[:count] or self.train_table.captions[:count]
        with eval_mode(self.denoiser):
            sampling = GenerationSettings(steps=self.settings.sample_steps, height=self.resolution,
                                          width=self.resolution)
            images = generate(self.model, captions, [self.seed + i for i in range(len(captions))], sampling,
                              pipe=self.sample_pipeline(), max_length=self.text_length)
        return list(zip(captions, images))

    def sample_pipeline(self):
        """The pipeline the sample images are drawn with (None: ``generate``'s own, built from the model)."""
        return None


class LoraTrainTask(DiffusionTrainTask):
    """``train_target=lora``: the diffusion objective on a LoRA adapter of the UNet (and of the text encoder with
    ``lora_text_encoder``); everything else frozen. Checkpoints are the adapter alone, in diffusers' LoRA format."""

    def __init__(self, model: LatentDiffusion, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        from modelzoo import lora

        settings = self.settings
        if settings.train_text_encoder:
            raise UserError("train_text_encoder=True trains the whole text encoder; with train_target=lora use "
                            "lora_text_encoder=True for a LoRA of it")
        self.lora_text_encoder = bool(settings.lora_text_encoder)
        if settings.base_precision in lowbit.LOW_BIT:  # before the adapters: peft wraps the quantised layers
            self._quantise_frozen_denoiser()
        trainable = lora.add_training_adapters(model, settings.lora_rank, settings.lora_alpha or settings.lora_rank,
                                               settings.lora_dropout, lora.target_modules(
                                                   settings.lora_target_modules, model), self.lora_text_encoder)
        self.train_text_encoder = self.lora_text_encoder  # the text encoder's forward pass needs gradients then
        model.text_encoder.train(self.lora_text_encoder)
        total = sum(p.numel() for part in (self.denoiser, model.text_encoder) for p in part.parameters())
        logger.info("train_target=lora: %d trainable parameters (%.2f %% of %d)", trainable, 100 * trainable / total,
                    total)
        if settings.base_precision != "fp32":
            self._train_adapters_in_fp32()

    def _train_adapters_in_fp32(self) -> None:
        """Frozen weights loaded in bf16 (base_precision): peft made the adapters in their dtype; they are trained,
        kept by the optimiser and EMA, and saved in fp32, as diffusers' LoRA scripts upcast them
        (``cast_training_params``). Each LoRA layer computes its base layer in bf16 and its branch in fp32."""
        from diffusers.training_utils import cast_training_params

        cast_training_params([self.denoiser, self.model.text_encoder], dtype=torch.float32)
        logger.info("base_precision=%s: the frozen weights in %s, the adapters in fp32", self.settings.base_precision,
                    str(self.denoiser.dtype).removeprefix("torch."))

    def save_model(self, folder: str, weights: dict[str, torch.Tensor]) -> list[str]:
        from modelzoo import lora

        return lora.save_adapters(folder, self.model, weights)


class FlowMatchingTrainTask(DiffusionTrainTask):
    """``train_target=transformer`` for the families that train on a text-embedding cache (Z-Image, Qwen-Image): the
    family's flow-matching objective (diffusers' DreamBooth-LoRA scripts': timestep density, sigmas of the
    scheduler's shift, loss weighting) on the whole transformer; the VAE and the text encoder stay frozen, each
    caption's embedding read from the cache (``TrainingData.texts``) — the text encoder never runs in a step, and
    leaves memory once the task is built (``release_text_encoder``; samples and checkpoints do without it). Buckets,
    cached latents, seeded per-sample draws and EMA as for SD-1.x; checkpoints are diffusers folders.

    ``train_text_encoder=True``: no cache; the text encoder encodes each step's captions as the pipeline does
    (``text_embeddings``, with gradients; a dropped caption is the empty prompt) and trains with the transformer
    under the one optimiser and EMA, but for the parameters its embeddings never reach (``text_encoder_unreached``);
    it stays in memory, and checkpoints save it from there."""

    SD_ONLY = ("snr_gamma", "high_noise_share", "noise_offset")

    def __init__(self, model, settings: TrainingSettings, data: TrainingData, *, seed: int, resolution: int,
                 text_length: int, use_amp: bool = False):
        self._take_data(model, settings, data, seed, resolution, text_length)
        family = families.family_of(model)
        given = [f"{name}={getattr(settings, name)}" for name in self.SD_ONLY if getattr(settings, name)]
        if given:
            raise UserError(f"{', '.join(given)}: SD-1.x's training settings do not apply to {family.name} models "
                            f"(their flow-matching loss is shaped by weighting_scheme, logit_mean, logit_std, "
                            f"mode_scale)")
        if settings.lora_text_encoder:
            raise UserError(f"lora_text_encoder=True: diffusers' {family.name} pipelines load LoRAs of the transformer "
                            f"only; train the whole text encoder with train_target=transformer train_text_encoder=True")
        if settings.train_text_encoder and settings.train_target != "transformer":
            raise UserError(f"train_text_encoder=True trains the whole text encoder beside the whole transformer: use "
                            f"train_target=transformer (a {family.name} LoRA is the transformer's alone)")
        self.objective = family.objective(model, weighting_scheme=settings.weighting_scheme,
                                          logit_mean=settings.logit_mean, logit_std=settings.logit_std,
                                          mode_scale=settings.mode_scale)
        self.num_timesteps = self.objective.num_timesteps
        self.train_text_encoder = bool(settings.train_text_encoder)
        self.texts = data.texts  # None with train_text_encoder: nothing cached
        self.val_texts = [self.texts[caption] for caption in self.val_captions] if self.texts is not None else None
        model.vae.requires_grad_(False).eval()
        model.text_encoder.requires_grad_(False).eval()
        if self.train_text_encoder:
            self._train_text_encoder()
        self.denoiser.requires_grad_(True).train()
        if settings.gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()

    def _train_text_encoder(self) -> None:
        """The text encoder's parameters that its embeddings reach made trainable (the others would get no
        gradients: frozen, as they were read), in training mode, with gradient checkpointing where it has it."""
        encoder, settings = self.model.text_encoder, self.settings
        unreached = families.family_of(self.model).text_encoder_unreached(self.model)
        for name, param in encoder.named_parameters():
            param.requires_grad_(not name.startswith(unreached))
        encoder.train()
        if settings.gradient_checkpointing and getattr(encoder, "supports_gradient_checkpointing", False):
            # transformers 5 renamed it (the old name warns); either takes torch's checkpoint options first
            enable = getattr(encoder, "activation_checkpointing_enable", None) or encoder.gradient_checkpointing_enable
            enable({"use_reentrant": False})
        trained = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        logger.info("train_text_encoder=True: %d of the text encoder's %d parameters train with the transformer "
                    "(the rest never reach its embeddings: %s); captions encoded in every step", trained,
                    sum(p.numel() for p in encoder.parameters()), ", ".join(unreached))

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        modules = {families.family_of(self.model).denoiser: self.denoiser}
        if self.train_text_encoder:
            modules["text_encoder"] = self.model.text_encoder
        return modules

    def _timestep(self, g: torch.Generator) -> int:
        return self.objective.draw_index(g)

    def _text_inputs(self, captions: list[str]) -> dict[str, Any]:
        if self.train_text_encoder:  # encoded in the step, with gradients
            return {"captions": captions}
        return {"texts": [self.texts[caption] for caption in captions]}

    def _texts(self, batch: dict) -> list[torch.Tensor]:
        if "texts" in batch:
            return batch["texts"]
        return families.family_of(self.model).text_embeddings(self.model, batch["captions"], self.text_length)

    def _latents(self, batch: dict) -> torch.Tensor:
        family, vae = families.family_of(self.model), self.model.vae
        if "moments" in batch:
            moments = batch["moments"].to(vae.device)
        else:
            with torch.no_grad():
                moments = family.vae_moments(self.model, batch["pixels"].to(vae.device, vae.dtype)).float()
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return family.training_latents(self.model, mean, logvar, batch["eps"])

    def loss(self, batch: dict) -> torch.Tensor:
        device = self.model.device
        return self.objective.loss(self._latents(batch).to(device), batch["noise"].to(device), batch["timesteps"],
                                   self._texts(batch))

    def _text_encoder_evaluating(self):
        """The trained text encoder in eval mode for a validation pass or samples (nothing where it is frozen)."""
        return eval_mode(self.model.text_encoder) if self.train_text_encoder else contextlib.nullcontext()

    def validate(self) -> float | None:
        if not self.val_captions:
            return None
        with eval_mode(self.denoiser), self._text_encoder_evaluating():
            texts = self.val_texts if self.val_texts is not None else encoded_captions(
                self.model, self.val_captions, self.text_length)  # by the text encoder as it is now
            return fixed_noise_flow_loss(self.model, texts, self.val_moments)

    def sample_images(self, count: int) -> list[tuple[str, Any]]:
        with self._text_encoder_evaluating():
            return super().sample_images(count)

    def release_text_encoder(self) -> None:
        """Once the task is built (a LoRA's adapters added): every caption the run needs is in the cache — the
        training and validation captions (the sample images' among them) and the empty prompt that the samples'
        guidance takes — so the text encoder leaves memory, in each process (``DiTFamily.release_text_encoder``).
        A text encoder that trains stays."""
        if self.train_text_encoder:
            logger.info("text encoder kept in memory: it trains (train_text_encoder=True), and checkpoints save it "
                        "from memory")
            return
        family = families.family_of(self.model)
        missing = {"", *self.train_table.captions, *self.val_captions} - set(self.texts)
        if missing:  # read_training_data caches them all: a caller that did not
            raise ValueError(f"{len(missing)} captions are not in the text-embedding cache")
        freed = family.release_text_encoder(self.model)
        if freed:
            logger.info("text encoder released after caching %d captions (%.1f MiB of weights freed; checkpoints "
                        "copy its files from %s)", len(self.texts), freed / 1024 ** 2,
                        family.text_encoder_folder(self.model))
        elif self.model.text_encoder is not None:
            logger.info("text encoder kept in memory: the model was read from no folder, and checkpoints save it "
                        "from memory")

    def sample_pipeline(self):
        """The family's pipeline, the samples' prompts handed to it as their cached embeddings (the text encoder
        has left memory): the images it draws from the prompts themselves. A text encoder that trains encodes them
        itself (``generate``'s own pipeline)."""
        if self.train_text_encoder:
            return None
        return CachedPromptPipeline(build_pipeline(self.model), self.model, self.texts)


class CachedPromptPipeline:
    """A family's pipeline called with ``prompt_embeds`` from the text-embedding cache instead of the prompts
    (``DiTFamily.embedded_prompt_arguments``), for a model whose text encoder has left memory. Everything else is
    the pipeline's."""

    def __init__(self, pipe, model, texts: dict[str, torch.Tensor]):
        self.pipe, self.model, self.texts = pipe, model, texts

    def __getattr__(self, name: str):
        if name == "pipe":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __call__(self, **arguments):
        family = families.family_of(self.model)
        return self.pipe(**family.embedded_prompt_arguments(self.model, arguments, self.texts))


class FlowMatchingLoraTask(LoraTrainTask, FlowMatchingTrainTask):
    """``train_target=lora`` for those families: a LoRA of the transformer's attention (the targets of diffusers'
    scripts) on the flow-matching objective, saved as the family's pipeline saves LoRA weights."""


def controlnet_conditioning_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The ControlNet's conditioning embedding: diffusers' (16, 32, 96, 256) maps an image to SD's latents (÷8); one
    stride-2 stage per factor of 2 of the VAE."""
    return (16, 32, 96, 256)[:vae_scale_factor.bit_length()]


class ControlNetTrainTask(DiffusionTrainTask):
    """``train_target=controlnet``: a ControlNet initialised from the model's UNet (its encoder half copied, zero
    convolutions at zero, as diffusers' train_controlnet.py does) — or continued from ``controlnet=FOLDER`` — trained
    on the diffusion objective with each row's conditioning image (the table's ``control`` column, resized and cropped
    as its image, in [0, 1]); the UNet, text encoder and VAE stay frozen. Checkpoints are diffusers ControlNetModel
    folders (``controlnet=CHECKPOINT_DIR`` in predict, serve and the Python API)."""

    def __init__(self, model: LatentDiffusion, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        from diffusers import ControlNetModel

        from appzoo.latent_diffusion.conditioning import parse_controlnets

        if self.train_text_encoder:
            raise UserError("train_text_encoder=True with train_target=controlnet: the ControlNet is trained against "
                            "the frozen text encoder; leave it False")
        model.unet.requires_grad_(False).eval()
        start = parse_controlnets(self.settings.controlnet)
        if len(start) > 1:
            raise UserError("train_target=controlnet continues at most one ControlNet (controlnet=FOLDER)")
        if start:
            from appzoo.latent_diffusion.conditioning import load_controlnets

            self.controlnet = load_controlnets([start[0][0]], model.device, torch.float32)[0]
            logger.info("train_target=controlnet: continuing %s", start[0][0])
        else:
            torch.manual_seed(self.seed)
            self.controlnet = ControlNetModel.from_unet(
                model.unet, conditioning_embedding_out_channels=controlnet_conditioning_channels(
                    model.vae_scale_factor)).to(model.device, torch.float32)
        if self.settings.base_precision in lowbit.LOW_BIT:  # after from_unet, which copies the unquantised weights
            self._quantise_frozen_denoiser()
        self.controlnet.train()
        if self.settings.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
        # each row's conditioning image with the same seeded crop and flip as its image: the layout stays where the
        # picture is
        self.controls = PixelReader(self.train_table, self.sizes, seed=self.seed,
                                    random_crop=self.settings.random_crop, random_flip=self.settings.random_flip,
                                    column=CONTROL_COLUMN)
        count = sum(p.numel() for p in self.controlnet.parameters())
        logger.info("train_target=controlnet: %d trainable parameters (the UNet's %d stay frozen); conditioning "
                    "images from the '%s' column", count, sum(p.numel() for p in model.unet.parameters()),
                    CONTROL_COLUMN)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"controlnet": self.controlnet}

    def batches(self, order: list[list[int]], epoch: int):
        for indices, batch in zip(order, super().batches(order, epoch)):
            batch["control"] = (self.controls.pixels(indices, epoch) + 1) / 2  # the ControlNet's input is in [0, 1]
            yield batch

    def _residuals(self, control: torch.Tensor):
        def residuals(noisy, timesteps, embeds):
            low_precision_base = self.settings.base_dtype is not None  # an fp32 ControlNet between bf16 models
            if low_precision_base:
                noisy, embeds = noisy.to(self.controlnet.dtype), embeds.to(self.controlnet.dtype)
            down, mid = self.controlnet(noisy, timesteps, encoder_hidden_states=embeds,
                                        controlnet_cond=control.to(noisy.device), return_dict=False)
            if low_precision_base:  # the residuals are added to the UNet's bf16 activations
                dtype = self.model.unet.dtype
                down, mid = [residual.to(dtype) for residual in down], mid.to(dtype)
            return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

        return residuals

    def unet_residuals(self, batch: dict):
        return self._residuals(batch["control"])

    def validate(self) -> float | None:
        if not self.val_captions or self.val_table is None:
            return None
        rows = min(len(self.val_captions), VALIDATION_ROWS)
        square = PixelReader(self.val_table, [(self.resolution, self.resolution)] * rows, seed=self.seed,
                             column=CONTROL_COLUMN)  # centre crops, as the validation latents
        controls = (square.pixels(list(range(rows)), None) + 1) / 2
        with eval_mode(self.controlnet):
            return fixed_noise_loss(self.model, self.val_captions[:rows], self.val_moments[:rows], self.text_length,
                                    residuals=lambda start, stop: self._residuals(controls[start:stop]))

    def save_model(self, folder: str, weights: dict[str, torch.Tensor]) -> list[str]:
        from safetensors.torch import save

        from easynlp_ldm.files import atomic_write_bytes, atomic_write_text

        os.makedirs(folder, exist_ok=True)
        state = {name[len("controlnet."):]: tensor.detach().cpu().contiguous() for name, tensor in weights.items()}
        weights_path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
        atomic_write_bytes(weights_path, save(state, metadata={"format": "pt"}))
        config_path = os.path.join(folder, "config.json")
        atomic_write_text(config_path, self.controlnet.to_json_string())
        return [weights_path, config_path]

    def sample_images(self, count: int) -> list[tuple[str, Any]]:
        from appzoo.latent_diffusion.conditioning import ImageInputs

        table = self.val_table if self.val_table is not None and len(self.val_table) else self.train_table
        rows = list(range(min(count, len(table))))
        controls = [table.read_image(i, CONTROL_COLUMN) for i in rows]
        captions = [table.captions[i] for i in rows]
        vae = self.model.vae
        mixed = (self.model.unet, self.controlnet, vae.post_quant_conv or vae.decoder) \
            if self.settings.base_dtype is not None else ()
        with eval_mode(self.controlnet), inputs_in_own_dtype(*mixed):
            sampling = GenerationSettings(steps=self.settings.sample_steps, height=self.resolution,
                                          width=self.resolution, controlnets=(("training", 1.0),))
            images = generate(self.model, captions, [self.seed + i for i in rows], sampling,
                              max_length=self.text_length, inputs=ImageInputs(controls=[controls]),
                              controlnet=self.controlnet)
        return [(f"{caption} (with its layout)", image) for caption, image in zip(captions, images)]


@contextlib.contextmanager
def inputs_in_own_dtype(*modules: torch.nn.Module):
    """Each of ``modules`` casts its floating-point inputs (lists of them included) to its own dtype for the block:
    diffusers' ControlNet pipeline gives the fp32 ControlNet of a base_precision run the bf16 text encoder's
    embeddings, the bf16 UNet the fp32 latents and the ControlNet's fp32 residuals, and the bf16 VAE's decoder the
    fp32 latents."""

    def hook(module, args, kwargs):
        dtype = next(p.dtype for p in module.parameters() if p.dtype in (torch.float32, torch.bfloat16))

        def cast(value):
            if torch.is_tensor(value) and value.is_floating_point():
                return value.to(dtype)
            return type(value)(cast(v) for v in value) if isinstance(value, (list, tuple)) else value

        return cast(args), {name: cast(value) for name, value in kwargs.items()}

    handles = [module.register_forward_pre_hook(hook, with_kwargs=True) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _freeze_all(model: LatentDiffusion) -> None:
    for module in (model.unet, model.text_encoder, model.vae):
        module.requires_grad_(False).eval()


class VAETrainTask:
    """Reconstruction (L1 + MSE) plus a small KL term, with the posterior sampled per sample from seeded noise.

    ``decoder_only``: the encoder (and ``quant_conv``) stay frozen, so the latent space — and with it the diffusion
    model trained on it and the latent scaling factor — stays valid; only the decoder learns to draw what the latents
    already encode (e.g. a new shape's details). No KL term then: the posterior does not change."""

    def __init__(self, model: LatentDiffusion, settings: TrainingSettings, data: TrainingData, seed: int,
                 resolution: int, decoder_only: bool = False):
        self.model, self.train, self.val, self.settings = model, data.train, data.val, settings
        self.seed, self.resolution, self.decoder_only = seed, resolution, decoder_only
        self.pixels = PixelReader(data.train, [(resolution, resolution)] * len(data.train), seed=seed,
                                  random_crop=settings.random_crop, random_flip=settings.random_flip)
        _freeze_all(model)
        model.vae.requires_grad_(True).train()
        if decoder_only:
            model.vae.encoder.requires_grad_(False).eval()
            model.vae.quant_conv.requires_grad_(False).eval()
        factor = model.vae_scale_factor
        self.latent_shape = (model.vae.config.latent_channels, resolution // factor, resolution // factor)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"vae": self.model.vae}

    def num_examples(self) -> int:
        return len(self.train)

    def batches(self, order: list[list[int]], epoch: int):
        for indices in order:
            pixels = self.pixels.pixels(indices, epoch)
            eps = torch.stack([torch.randn(self.latent_shape, generator=sample_generator(self.seed, epoch, i,
                                                                                         TRAIN_STAGE))
                               for i in indices])
            yield {"pixels": pixels, "eps": eps}

    def loss(self, batch: dict) -> torch.Tensor:
        vae = self.model.vae
        x = batch["pixels"].to(vae.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.decoder_only):
            dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * batch["eps"].to(x.device)
        reconstruction = vae.decode(z).sample.float()
        loss = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x)
        if self.decoder_only:
            return loss
        kl = dist.kl().mean() / float(np.prod(self.latent_shape))
        return loss + self.settings.vae_kl_weight * kl

    def _images(self, table: IndexedTable, count: int) -> torch.Tensor:
        return torch.stack([preprocess_image(table.read_image(i), self.resolution)
                            for i in range(min(count, len(table)))])

    @torch.no_grad()
    def validate(self) -> float | None:
        if not self.val or not len(self.val):
            return None
        vae = self.model.vae
        with eval_mode(vae):
            x = self._images(self.val, VALIDATION_ROWS).to(vae.device)
            total = 0.0
            for start in range(0, len(x), 32):
                chunk = x[start:start + 32]
                reconstruction = vae.decode(vae.encode(chunk).latent_dist.mean).sample.float()
                total += float(F.mse_loss(reconstruction, chunk)) * len(chunk)
            return total / len(x)

    @torch.no_grad()
    def save_model(self, folder: str, weights: dict[str, torch.Tensor]) -> list[str]:
        if self.decoder_only:  # same encoder, same latent space: the diffusion model's scaling factor stays
            return families.save(self.model, folder, overrides=weights)
        # The latent scaling factor makes the saved VAE's latents unit-variance for the diffusion model.
        vae = copy.deepcopy(self.model.vae).eval()
        vae.load_state_dict({k[len("vae."):]: v for k, v in weights.items()}, strict=False)
        x = self._images(self.train, SCALING_SAMPLE).to(vae.device)
        latents = torch.cat([vae.encode(x[i:i + 32]).latent_dist.mean for i in range(0, len(x), 32)])
        scaling = float(1.0 / latents.float().std().clamp(min=1e-6))
        self.model.vae.register_to_config(scaling_factor=scaling)
        return families.save(self.model, folder, overrides=weights)

    @torch.no_grad()
    def sample_images(self, count: int) -> list[tuple[str, Any]]:
        table = self.val if self.val and len(self.val) else self.train
        vae = self.model.vae
        with eval_mode(vae):
            x = self._images(table, count).to(vae.device)
            reconstruction = vae.decode(vae.encode(x).latent_dist.mean).sample
        pairs = torch.cat([x, reconstruction.clamp(-1, 1)], dim=3)  # original | reconstruction
        arrays = ((pairs.permute(0, 2, 3, 1).float().cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
        return [(f"{table.captions[i]} (original | reconstruction)", Image.fromarray(a)) for i, a in enumerate(arrays)]


class RRDBTrainTask:
    """ESRGAN ×4 on (bicubic ×1/4, original) pairs cropped from the table's images; L1 in [0, 1]."""

    def __init__(self, model: LatentDiffusion, settings: TrainingSettings, data: TrainingData, seed: int):
        from modelzoo.esrgan import RRDBNet, load_rrdbnet, plan_new_net
        from modelzoo.formats.easynlp import is_easynlp_model

        self.model, self.train, self.val, self.settings, self.seed = model, data.train, data.val, settings, seed
        _freeze_all(model)
        self.order = model.extra.get("esrgan_channel_order", "rgb")  # what predict's do_sr will feed the net
        if model.esrgan_path:
            self.net = load_rrdbnet(model.esrgan_path)
            logger.info("fine-tuning the model's super-resolution net %s (%s)", model.esrgan_path, self.order.upper())
        else:
            torch.manual_seed(seed)
            plan = plan_new_net(is_easynlp_model(model), self.order, settings.rrdb_nf, settings.rrdb_nb,
                                settings.rrdb_gc)
            self.net = RRDBNet(**plan.architecture)
            # A warning when an EasyNLP-format model's file would not load in EasyNLP (rrdb_nf/nb/gc given).
            level = logging.WARNING if plan.easynlp_format and not plan.easynlp_loads else logging.INFO
            logger.log(level, "training %s", plan.describe())
        self.device = model.device
        self.net.to(self.device).train()
        self.patch = settings.sr_patch

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"rrdb": self.net}

    def num_examples(self) -> int:
        return len(self.train)

    def _pair(self, image: Image.Image, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        width, height = image.size
        if min(width, height) < self.patch:
            raise UserError(f"sr_patch={self.patch} is larger than an image of the table ({width}×{height}); "
                            f"lower sr_patch or use larger images")
        if generator is not None:
            top = int(torch.randint(0, height - self.patch + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - self.patch + 1, (1,), generator=generator))
        else:
            top, left = (height - self.patch) // 2, (width - self.patch) // 2
        hr = image.crop((left, top, left + self.patch, top + self.patch))
        if generator is not None and float(torch.rand(1, generator=generator)) < 0.5:
            hr = hr.transpose(Image.FLIP_LEFT_RIGHT)
        lr = hr.resize((self.patch // 4, self.patch // 4), Image.BICUBIC)

        def tensor(img):
            return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)

        return tensor(lr), tensor(hr)

    def batches(self, order: list[list[int]], epoch: int):
        for indices in order:
            pairs = [self._pair(self.train.read_image(i), sample_generator(self.seed, epoch, i, PIXEL_STAGE))
                     for i in indices]
            yield {"lr": torch.stack([p[0] for p in pairs]), "hr": torch.stack([p[1] for p in pairs])}

    def loss(self, batch: dict) -> torch.Tensor:
        from modelzoo.esrgan import forward_in_order

        return F.l1_loss(forward_in_order(self.net, batch["lr"].to(self.device), self.order).float(),
                         batch["hr"].to(self.device))

    @torch.no_grad()
    def validate(self) -> float | None:
        from modelzoo.esrgan import forward_in_order

        if not self.val or not len(self.val):
            return None
        with eval_mode(self.net):
            pairs = [self._pair(self.val.read_image(i), None) for i in range(min(64, len(self.val)))]
            lr = torch.stack([p[0] for p in pairs]).to(self.device)
            hr = torch.stack([p[1] for p in pairs]).to(self.device)
            return float(F.l1_loss(forward_in_order(self.net, lr, self.order).clamp(0, 1), hr))

    def save_model(self, folder: str, weights: dict[str, torch.Tensor]) -> list[str]:
        from modelzoo.esrgan import save_rrdbnet

        os.makedirs(folder, exist_ok=True)
        net = copy.deepcopy(self.net)
        net.load_state_dict({k[len("rrdb."):]: v for k, v in weights.items()})
        path = os.path.join(folder, ESRGAN_NAME)
        save_rrdbnet(net, path)
        self.model.esrgan_path = path
        self.model.extra["esrgan_channel_order"] = self.order
        return families.save(self.model, folder)

    @torch.no_grad()
    def sample_images(self, count: int) -> list[tuple[str, Any]]:
        from modelzoo.esrgan import upscale

        table = self.val if self.val and len(self.val) else self.train
        with eval_mode(self.net):
            images = []
            for i in range(min(count, len(table))):
                hr = table.read_image(i)
                lr = hr.resize((hr.width // 4, hr.height // 4), Image.BICUBIC)
                images.append((f"{table.captions[i]} (×4 from {lr.width}px)",
                               upscale(self.net, lr, tile=0, channel_order=self.order)))
            return images
