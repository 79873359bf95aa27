"""``--mode=train``: the model and tables resolved, the diffusion objective and data as a ``TrainTask`` for the
framework trainer (or the VAE/RRDB tasks of ``train_components``), then the trainer's loop."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from appzoo.latent_diffusion.data import (
    PIXEL_STAGE,
    TRAIN_STAGE,
    IndexedTable,
    index_table,
    preprocess_image,
    sample_generator,
)
from appzoo.latent_diffusion.generation import GenerationSettings, generate
from appzoo.latent_diffusion.inputs import InputTables, input_tables, text_length
from appzoo.latent_diffusion.loading import load_model
from appzoo.latent_diffusion.losses import DiffusionObjective, LatentCache, fixed_noise_loss, sample_latents
from appzoo.latent_diffusion.train_components import build_component_task
from easynlp_ldm import distributed
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import BadRowPolicy
from easynlp_ldm.trainer import STATE_DIR, Trainer, TrainerConfig
from modelzoo.ldm import LatentDiffusion

logger = logging.getLogger("easynlp.train")


class _PixelDataset(torch.utils.data.Dataset):
    def __init__(self, task: DiffusionTrainTask, epoch: int):
        self.task, self.epoch = task, epoch

    def __len__(self) -> int:
        return len(self.task.train_table)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.task._pixels([index], self.epoch)[0]


class DiffusionTrainTask:
    def __init__(self, model: LatentDiffusion, train: IndexedTable, train_moments: torch.Tensor | None,
                 val_captions: list[str], val_moments: torch.Tensor | None, *, params: dict[str, Any], seed: int,
                 resolution: int, text_length: int, data_threads: int = 0, use_amp: bool = False):
        self.model, self.train_table, self.train_moments = model, train, train_moments
        self.val_captions, self.val_moments = val_captions, val_moments
        self.params, self.seed, self.resolution = params, seed, resolution
        self.text_length, self.data_threads = text_length, data_threads
        self.objective = DiffusionObjective(model, params["snr_gamma"])
        self.num_timesteps = self.objective.num_timesteps
        factor = model.vae_scale_factor
        self.latent_shape = (model.latent_channels, resolution // factor, resolution // factor)
        self.train_text_encoder = bool(params["train_text_encoder"])
        model.vae.requires_grad_(False).eval()
        model.text_encoder.requires_grad_(self.train_text_encoder)
        model.text_encoder.train(self.train_text_encoder)
        model.unet.requires_grad_(True).train()
        if use_amp and model.unet.device.type == "cpu":
            from modelzoo.attention import Float32AttentionProcessor

            model.unet.set_attn_processor(Float32AttentionProcessor())
        if params["gradient_checkpointing"]:
            model.unet.enable_gradient_checkpointing()
            if self.train_text_encoder and hasattr(model.text_encoder, "gradient_checkpointing_enable"):
                model.text_encoder.gradient_checkpointing_enable()

    # ---------------------------------------------------------------------------------------- the protocol
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        modules = {"unet": self.model.unet}
        if self.train_text_encoder:
            modules["text_encoder"] = self.model.text_encoder
        return modules

    def num_examples(self) -> int:
        return len(self.train_table)

    def _draws(self, indices: list[int], epoch: int) -> dict[str, torch.Tensor]:
        dropout, timesteps, noise, eps, offsets = [], [], [], [], []
        channels = self.latent_shape[0]
        for index in indices:
            g = sample_generator(self.seed, epoch, index, TRAIN_STAGE)
            dropout.append(float(torch.rand(1, generator=g)) < self.params["caption_dropout"])
            timesteps.append(int(torch.randint(0, self.num_timesteps, (1,), generator=g)))
            noise.append(torch.randn(self.latent_shape, generator=g))
            eps.append(torch.randn(self.latent_shape, generator=g))
            offsets.append(torch.randn((channels, 1, 1), generator=g))
        return {"dropout": dropout, "timesteps": torch.tensor(timesteps, dtype=torch.long),
                "noise": torch.stack(noise), "eps": torch.stack(eps), "offsets": torch.stack(offsets)}

    def _pixels(self, indices: list[int], epoch: int) -> torch.Tensor:
        params = self.params
        return torch.stack([
            preprocess_image(self.train_table.read_image(i), self.resolution, random_crop=params["random_crop"],
                             random_flip=params["random_flip"],
                             generator=sample_generator(self.seed, epoch, i, PIXEL_STAGE)) for i in indices])

    def _pixel_batches(self, order: list[list[int]], epoch: int):
        """Decoded, cropped pixels per micro-batch; in ``--data_threads`` worker processes when above 0."""
        if self.data_threads <= 0:
            for indices in order:
                yield self._pixels(indices, epoch)
            return
        dataset = _PixelDataset(self, epoch)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=order, num_workers=self.data_threads)
        yield from loader

    def batches(self, order: list[list[int]], epoch: int):
        pixel_iter = self._pixel_batches(order, epoch) if self.train_moments is None else None
        for indices in order:
            captions = [self.train_table.captions[i] for i in indices]
            draws = self._draws(indices, epoch)
            captions = ["" if drop else caption for drop, caption in zip(draws["dropout"], captions)]
            batch = {"input_ids": self.model.tokenize(captions, self.text_length), **draws}
            if self.train_moments is not None:
                batch["moments"] = self.train_moments[indices]
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
        if self.params["noise_offset"]:
            noise = noise + self.params["noise_offset"] * batch["offsets"]
        device = self.model.unet.device
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_text_encoder):
            embeds = self.model.encode_tokens(batch["input_ids"])
        return self.objective.per_sample_loss(latents.to(device), noise.to(device), batch["timesteps"].to(device),
                                              embeds).mean()

    def validate(self) -> float | None:
        if not self.val_captions:
            return None
        was_training = self.model.unet.training
        self.model.unet.eval()
        try:
            return fixed_noise_loss(self.model, self.val_captions, self.val_moments, self.text_length)
        finally:
            self.model.unet.train(was_training)

    def save_model(self, folder: str, weights: dict[str, torch.Tensor]) -> list[str]:
        return self.model.save_pretrained(folder, overrides=weights)

    def sample_images(self) -> list[tuple[str, Any]]:
        captions = self.val_captions[:2] or self.train_table.captions[:2]
        was_training = self.model.unet.training
        self.model.unet.eval()
        try:
            images = generate(self.model, captions, [self.seed + i for i in range(len(captions))],
                              GenerationSettings(steps=10, height=self.resolution, width=self.resolution),
                              max_length=self.text_length)
        finally:
            self.model.unet.train(was_training)
        return list(zip(captions, images))


def build_unet_task(model: LatentDiffusion, inputs: InputTables, flags: ParsedFlags, params: dict,
                    policy: BadRowPolicy, resolution: int, text_length: int) -> DiffusionTrainTask:
    random_pixels = params["random_crop"] or params["random_flip"]
    use_cache = params["cache_latents"] and not random_pixels
    if params["cache_latents"] and random_pixels:
        logger.warning("cache_latents is off: random_crop/random_flip change the pixels every epoch")
    cache = LatentCache(model, resolution, use_amp=flags.use_amp) if use_cache else None
    tables = inputs.tables
    logger.info("reading %s%s", tables[0], " and caching VAE latents" if use_cache else "")
    train = index_table(tables[0], inputs, policy, on_image=cache.add if cache else None)
    val_captions, val_moments = [], None
    if len(tables) == 2:
        val_cache = LatentCache(model, resolution, use_amp=flags.use_amp)
        val = index_table(tables[1], inputs, policy, on_image=val_cache.add)
        val_captions, val_moments = val.captions, val_cache.moments()
    data_threads = flags.data_threads if not use_cache else 0
    if use_cache and "data_threads" in flags.given:
        logger.warning("--data_threads has no effect with cached latents (nothing is decoded during training)")
    return DiffusionTrainTask(model, train, cache.moments() if cache else None, val_captions, val_moments,
                              params=params, seed=flags.random_seed, resolution=resolution, text_length=text_length,
                              data_threads=min(data_threads, os.cpu_count() or 1), use_amp=flags.use_amp)


def run(flags: ParsedFlags, params: dict[str, Any]) -> int:
    """Resolve the model and tables, build the task and the trainer, train."""
    if not flags.checkpoint_dir:
        raise UserError("--checkpoint_dir is required for --mode=train (the folder the model is saved to)")
    inputs = input_tables(flags, "train", default_schema=None, max_tables=2, need_image=True)
    out = flags.checkpoint_dir
    existing_state = os.path.isdir(os.path.join(out, STATE_DIR))
    if existing_state and not flags.resume_from_checkpoint and not params["reset_model_state_flag"]:
        raise UserError(f"--checkpoint_dir={out} already holds a training run; pass --resume_from_checkpoint={out} "
                        f"to continue it, reset_model_state_flag=True to start over from the pretrained model, or "
                        f"choose another folder")
    model = load_model(params["pretrain_model_name_or_path"], modelzoo_base_dir=flags.modelzoo_base_dir,
                       what="pretrain_model_name_or_path")
    length = text_length(model, flags)
    resolution = params["resolution"] or model.image_size
    if resolution % model.vae_scale_factor:
        raise UserError(f"resolution={resolution} must be a multiple of the VAE factor {model.vae_scale_factor}")
    policy = BadRowPolicy(skip=params["skip_bad_rows"])
    if params["train_target"] == "unet":
        task = build_unet_task(model, inputs, flags, params, policy, resolution, length)
    else:
        task = build_component_task(params["train_target"], model, inputs, flags, params, policy, resolution)
    if policy.total:
        logger.warning("%s", policy.summary())
    ctx = distributed.context()
    config = TrainerConfig.from_flags(flags, rank=ctx.rank, world_size=ctx.world_size, use_ema=params["use_ema"],
                                      ema_decay=params["ema_decay"],
                                      progress=os.environ.get("EASYNLP_PROGRESS", "1") != "0")
    result = Trainer(config, task).train()
    summary = f"trained {result['step']} steps; model saved to {out}"
    if result["best_val_loss"] is not None:
        summary += f" (best validation loss {result['best_val_loss']:.5f}; last/ holds the final weights)"
    if policy.total:
        summary += f"; {policy.summary()}"
    logger.info(summary)
    return 0
