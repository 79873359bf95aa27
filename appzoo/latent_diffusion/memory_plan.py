"""``--mode=train``'s memory plan for the latent_diffusion app: the training settings → the framework's
``MemorySettings``, the model's footprint from its family (``ModelFamily.memory_footprint``: for SD-1.x,
modelzoo/families/sd_memory.py), checked against the memory available (easynlp_ldm/memory.py) before the first step.
The estimate is per process of the run; a LoRA or ControlNet run that does not fit is also told which
``base_precision`` would.
"""

from __future__ import annotations

import dataclasses

from appzoo.latent_diffusion.params import PARAMS
from appzoo.latent_diffusion.settings import TrainingSettings
from easynlp_ldm import distributed
from easynlp_ldm.memory import MemoryEstimate, MemorySettings, check
from modelzoo import lowbit
from modelzoo.families import family_of


def frozen_param_bytes(model, frozen_count: int, precision: str) -> float:
    """Bytes per frozen parameter at ``base_precision=precision``: 2 in bf16; int8, fp8 and nf4 quantise the
    denoiser's linear weights and keep the rest in bf16 (modelzoo/lowbit.py)."""
    if precision in lowbit.LOW_BIT:
        return lowbit.frozen_param_bytes(getattr(model, family_of(model).denoiser), frozen_count, precision)
    return float(lowbit.BASE_BYTES)


def frozen_whole(model, precision: str) -> int:
    """The frozen weights ``base_precision=precision`` quantises, which sharding=fsdp leaves whole in every process."""
    if precision in lowbit.LOW_BIT:
        return lowbit.quantised_count(getattr(model, family_of(model).denoiser), precision)
    return 0


def precision_options(model, frozen_count: int) -> tuple[tuple[str, float, int], ...]:
    """base_precision's choices below fp32, as the memory plan proposes them (highest precision first)."""
    choices = next(param.choices for param in PARAMS if param.name == "base_precision")
    options = [(f"base_precision={name}", frozen_param_bytes(model, frozen_count, name), frozen_whole(model, name))
               for name in choices if name != "fp32"]
    return tuple(sorted(options, key=lambda option: -option[1]))


def check_latent_diffusion_training(model, flags, training: TrainingSettings, resolution: int,
                                    text_length: int) -> MemoryEstimate:
    """The memory plan of ``--mode=train`` for the latent_diffusion app: called once the model is loaded, before
    latents are cached and the optimiser is built."""
    device = model.device.type
    optimizer = training.optimizer
    if optimizer == "adamw":
        optimizer = {"SGD": "sgd", "Adam": "adam"}.get(flags.optimizer_type, "adamw")
    settings = MemorySettings(
        micro_batch_size=flags.micro_batch_size, resolution=resolution,
        gradient_checkpointing=bool(training.gradient_checkpointing), use_amp=bool(flags.use_amp),
        optimizer=optimizer, use_ema=bool(training.use_ema), ema_device=training.ema_device,
        save_optimizer=bool(training.save_optimizer), device="cpu" if device == "cpu" else "cuda",
        cache_inputs=bool(training.caches_latents), processes=distributed.context().world_size,
        sharding=training.sharding)
    footprint = family_of(model).memory_footprint(model, train_target=training.train_target,
                                                  train_text_encoder=bool(training.train_text_encoder),
                                                  text_length=text_length, lora_rank=training.lora_rank)
    if training.base_dtype is not None:  # base_precision: the frozen weights loaded in it, what trains in fp32
        footprint = dataclasses.replace(footprint, param_bytes=4, frozen_param_bytes=frozen_param_bytes(
            model, footprint.frozen_count, training.base_precision),
            frozen_whole=frozen_whole(model, training.base_precision))
    if training.train_target in ("lora", "controlnet"):  # the runs base_precision applies to
        footprint = dataclasses.replace(footprint, precision_options=precision_options(model, footprint.frozen_count))
    return check(footprint, settings, limit_gb=training.memory_limit_gb, enforce=training.memory_check,
                 effective_batch=flags.micro_batch_size * flags.gradient_accumulation_steps)
