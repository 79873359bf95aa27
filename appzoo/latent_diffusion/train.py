"""``--mode=train`` for latent_diffusion: the diffusion loss and data as a ``TrainTask`` for the framework trainer."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from appzoo.latent_diffusion.data import (
    PIXEL_STAGE,
    TRAIN_STAGE,
    IndexedTable,
    index_table,
    preprocess_image,
    sample_generator,
)
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import BadRowPolicy
from modelzoo.ldm import LatentDiffusion

logger = logging.getLogger("easynlp.train")

VALIDATION_SEED = 20240601  # fixed noise and timesteps: validation losses compare across steps and runs


class LatentCache:
    """Encodes images with the frozen VAE in batches and keeps the latent distribution's moments (mean, logvar).
    With ``use_amp`` the encoder runs under the same autocast as the training step, exactly as it would if the
    latents were not cached (and ~1.7× faster on CPU at 256²)."""

    def __init__(self, model: LatentDiffusion, resolution: int, batch_size: int = 32, use_amp: bool = False):
        self.model, self.resolution, self.batch_size = model, resolution, batch_size
        self.use_amp = use_amp
        self.pending: list[torch.Tensor] = []
        self.chunks: list[torch.Tensor] = []

    def add(self, index: int, image) -> None:
        self.pending.append(preprocess_image(image, self.resolution))
        if len(self.pending) >= self.batch_size:
            self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        if self.pending:
            from easynlp_ldm.trainer import amp_dtype

            device = self.model.vae.device
            pixels = torch.stack(self.pending).to(device, self.model.vae.dtype)
            with torch.autocast(device.type, dtype=amp_dtype(device), enabled=self.use_amp):
                moments = self.model.vae.encode(pixels).latent_dist.parameters
            self.chunks.append(moments.float().cpu())
            self.pending = []

    def moments(self) -> torch.Tensor:
        self.flush()
        return torch.cat(self.chunks) if self.chunks else torch.empty(0)


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
        self.noise_scheduler = DDPMScheduler.from_config(model.scheduler_config)
        self.num_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.prediction_type = self.noise_scheduler.config.prediction_type
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
        std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
        return (mean + std * batch["eps"].to(mean.device)) * self.model.vae_scaling_factor

    def _denoising_loss(self, latents, noise, timesteps, input_ids, reduce_snr: bool = True) -> torch.Tensor:
        device = self.model.unet.device
        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.train_text_encoder:
            embeds = self.model.encode_tokens(input_ids)
        else:
            with torch.no_grad():
                embeds = self.model.encode_tokens(input_ids)
        prediction = self.model.unet(noisy, timesteps, encoder_hidden_states=embeds).sample
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        gamma = self.params["snr_gamma"]
        if gamma and reduce_snr:
            snr = compute_snr(self.noise_scheduler, timesteps)
            weights = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
            weights = weights / (snr + 1) if self.prediction_type == "v_prediction" else weights / snr
            per_sample = per_sample * weights
        return per_sample.mean()

    def loss(self, batch: dict) -> torch.Tensor:
        latents = self._latents(batch)
        noise = batch["noise"]
        if self.params["noise_offset"]:
            noise = noise + self.params["noise_offset"] * batch["offsets"]
        return self._denoising_loss(latents, noise, batch["timesteps"], batch["input_ids"])

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
        from appzoo.latent_diffusion.pipeline import GenerationSettings, generate

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


@torch.no_grad()
def fixed_noise_loss(model: LatentDiffusion, captions: list[str], moments: torch.Tensor, text_length: int,
                     batch_size: int = 32) -> float:
    """Plain denoising MSE with latent means, fixed noise and timesteps spread evenly over the schedule: comparable
    across steps, runs and machines' batch sizes."""
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    steps = int(scheduler.config.num_train_timesteps)
    n = len(captions)
    g = torch.Generator().manual_seed(VALIDATION_SEED)
    latent_shape = (moments.shape[1] // 2, *moments.shape[2:])
    noise = torch.randn((n, *latent_shape), generator=g)
    timesteps = (torch.arange(n) * steps // n + steps // (2 * n)).clamp(max=steps - 1).long()
    device = model.unet.device
    total = 0.0
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        mean, _ = torch.chunk(moments[start:stop], 2, dim=1)
        latents = (mean * model.vae_scaling_factor).to(device)
        t = timesteps[start:stop].to(device)
        eps = noise[start:stop].to(device)
        embeds = model.encode_prompts(captions[start:stop], text_length)
        prediction = model.unet(scheduler.add_noise(latents, eps, t), t, encoder_hidden_states=embeds).sample
        target = scheduler.get_velocity(latents, eps, t) if scheduler.config.prediction_type == "v_prediction" \
            else eps
        total += float(F.mse_loss(prediction.float(), target.float())) * (stop - start)
    return total / n


def build_unet_task(model, tables_spec, flags, params, resolution: int, text_length: int) -> DiffusionTrainTask:
    tables, schema, text_column, image_column, skip_first_line, policy = tables_spec
    random_pixels = params["random_crop"] or params["random_flip"]
    use_cache = params["cache_latents"] and not random_pixels
    if params["cache_latents"] and random_pixels:
        logger.warning("cache_latents is off: random_crop/random_flip change the pixels every epoch")
    cache = LatentCache(model, resolution, use_amp=flags.use_amp) if use_cache else None
    logger.info("reading %s%s", tables[0], " and caching VAE latents" if use_cache else "")
    train = index_table(tables[0], schema, text_column, image_column, skip_first_line=skip_first_line,
                        policy=policy, on_image=cache.add if cache else None)
    val_captions, val_moments = [], None
    if len(tables) == 2:
        val_cache = LatentCache(model, resolution, use_amp=flags.use_amp)
        val = index_table(tables[1], schema, text_column, image_column, skip_first_line=skip_first_line,
                          policy=policy, on_image=val_cache.add)
        val_captions, val_moments = val.captions, val_cache.moments()
    data_threads = flags.data_threads if not use_cache else 0
    if use_cache and "data_threads" in flags.given:
        logger.warning("--data_threads has no effect with cached latents (nothing is decoded during training)")
    return DiffusionTrainTask(model, train, cache.moments() if cache else None, val_captions, val_moments,
                              params=params, seed=flags.random_seed, resolution=resolution, text_length=text_length,
                              data_threads=min(data_threads, os.cpu_count() or 1), use_amp=flags.use_amp)


def run_train(app) -> int:
    """Resolve the model and tables, build the task and the trainer, train."""
    from appzoo.latent_diffusion.app import resolve_model_path
    from easynlp_ldm.tables import parse_schema, split_tables
    from easynlp_ldm.trainer import STATE_DIR, Trainer, TrainerConfig

    flags, params = app.flags, app.params
    if not flags.checkpoint_dir:
        raise UserError("--checkpoint_dir is required for --mode=train (the folder the model is saved to)")
    tables = split_tables(flags.tables)
    if not tables:
        raise UserError("--tables is required for --mode=train: train.tsv[,valid.tsv]")
    if len(tables) > 2:
        raise UserError(f"--tables: train takes at most two tables (train,valid), got {len(tables)}")
    if not flags.input_schema:
        raise UserError("--input_schema is required, e.g. idx:str:1,text:str:1,imgbase64:str:1")
    schema = parse_schema(flags.input_schema)
    text_column = flags.first_sequence or "text"
    image_column = flags.second_sequence or "imgbase64"
    out = flags.checkpoint_dir
    existing_state = os.path.isdir(os.path.join(out, STATE_DIR))
    if existing_state and not flags.resume_from_checkpoint and not params["reset_model_state_flag"]:
        raise UserError(f"--checkpoint_dir={out} already holds a training run; pass --resume_from_checkpoint={out} "
                        f"to continue it, reset_model_state_flag=True to start over from the pretrained model, or "
                        f"choose another folder")
    from modelzoo.ldm import ModelFormatError

    model_path = resolve_model_path(params["pretrain_model_name_or_path"], flags, "pretrain_model_name_or_path")
    logger.info("loading %s", model_path)
    try:
        model = LatentDiffusion.from_pretrained(model_path)
    except ModelFormatError as err:
        raise UserError(str(err)) from None
    from easynlp_ldm import distributed

    model.to(distributed.model_device())
    text_length = model.clamp_text_length(flags.sequence_length if "sequence_length" in flags.given else None)
    resolution = params["resolution"] or model.image_size
    if resolution % model.vae_scale_factor:
        raise UserError(f"resolution={resolution} must be a multiple of the VAE factor {model.vae_scale_factor}")
    policy = BadRowPolicy(skip=params["skip_bad_rows"])
    tables_spec = (tables, schema, text_column, image_column, flags.skip_first_line, policy)
    if params["train_target"] == "unet":
        task = build_unet_task(model, tables_spec, flags, params, resolution, text_length)
    else:
        from appzoo.latent_diffusion.train_components import build_component_task

        task = build_component_task(params["train_target"], model, tables_spec, flags, params, resolution)
    if policy.total:
        logger.warning("%s", policy.summary())
    ctx = distributed.context()
    config = TrainerConfig(
        rank=ctx.rank, world_size=ctx.world_size, output_dir=out, learning_rate=flags.learning_rate,
        weight_decay=flags.weight_decay,
        max_grad_norm=flags.max_grad_norm, optimizer_type=flags.optimizer_type,
        warmup_proportion=flags.warmup_proportion, epoch_num=flags.epoch_num, micro_batch_size=flags.micro_batch_size,
        gradient_accumulation_steps=flags.gradient_accumulation_steps, logging_steps=flags.logging_steps,
        save_checkpoint_steps=flags.save_checkpoint_steps, save_all_checkpoints=flags.save_all_checkpoints,
        use_amp=flags.use_amp, seed=flags.random_seed, use_ema=params["use_ema"], ema_decay=params["ema_decay"],
        resume_from=flags.resume_from_checkpoint, progress=os.environ.get("EASYNLP_PROGRESS", "1") != "0")
    result = Trainer(config, task).train()
    summary = f"trained {result['step']} steps; model saved to {out}"
    if result["best_val_loss"] is not None:
        summary += f" (best validation loss {result['best_val_loss']:.5f}; last/ holds the final weights)"
    if policy.total:
        summary += f"; {policy.summary()}"
    logger.info(summary)
    return 0
