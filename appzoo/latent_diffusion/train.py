"""``--mode=train``: the settings typed (``TrainingSettings``), the model and tables resolved, the tables read once
(``data.read_training_data``), the training task of ``train_target`` built over them (``train_tasks``), the framework
trainer configured from the flags, and its loop run."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any

import torch

from appzoo.latent_diffusion import runs
from appzoo.latent_diffusion.data import TrainingData, read_training_data
from appzoo.latent_diffusion.inputs import input_tables, text_length
from appzoo.latent_diffusion.loading import load_model
from appzoo.latent_diffusion.memory_plan import check_latent_diffusion_training
from appzoo.latent_diffusion.settings import TrainingSettings
from appzoo.latent_diffusion.train_tasks import (
    ControlNetTrainTask,
    DiffusionTrainTask,
    FlowMatchingLoraTask,
    FlowMatchingTrainTask,
    LoraTrainTask,
    RRDBTrainTask,
    VAETrainTask,
)
from easynlp_ldm import distributed
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import BadRowPolicy
from easynlp_ldm.trainer import Trainer, TrainerConfig
from modelzoo import lowbit
from modelzoo.esrgan import training_advice
from modelzoo.families import family_of
from modelzoo.formats.easynlp import is_easynlp_model
from modelzoo.ldm import ESRGAN_NAME, LatentDiffusion

logger = logging.getLogger("easynlp.train")


def build_task(model: LatentDiffusion, settings: TrainingSettings, data: TrainingData, flags: ParsedFlags,
               resolution: int, text_length: int):
    """The training task of ``train_target`` over the data read for it."""
    target = settings.train_target
    if target in ("vae", "vae_decoder"):
        return VAETrainTask(model, settings, data, flags.random_seed, resolution, decoder_only=target == "vae_decoder")
    if target == "rrdb":
        return RRDBTrainTask(model, settings, data, flags.random_seed)
    if family_of(model).caches_text_embeddings:  # the flow-matching DiTs: transformer or lora
        task_class = FlowMatchingLoraTask if target == "lora" else FlowMatchingTrainTask
    else:
        task_class = {"lora": LoraTrainTask, "controlnet": ControlNetTrainTask}.get(target, DiffusionTrainTask)
    task = task_class(model, settings, data, seed=flags.random_seed, resolution=resolution, text_length=text_length,
                      use_amp=flags.use_amp)
    if family_of(model).caches_text_embeddings:  # its captions all cached: nothing runs the text encoder again
        task.release_text_encoder()
    return task


def record_native_size(model: LatentDiffusion, resolution: int) -> None:
    """A diffusion model fine-tuned at another resolution is saved as native at that one, so that predict and serve
    generate at the size it was trained for: ``image_size`` of the config, the UNet's ``sample_size`` (what a
    diffusers export and EasyNLP's format derive the size from) and, for a model read from EasyNLP's format (saved
    as one, from its own config), that config's latent ``image_size``."""
    if resolution == model.image_size:
        return
    logger.info("resolution=%d differs from the model's native size %d: the checkpoint records %d as its native "
                "size (predict and serve generate at %d×%d unless H/W say otherwise)", resolution, model.image_size,
                resolution, resolution, resolution)
    latent = resolution // model.vae_scale_factor
    model.image_size = resolution
    model.unet.register_to_config(sample_size=latent)
    source = model.extra.get("easynlp", {}).get("config")
    if source:
        config = copy.deepcopy(source)
        ldm = config["model"]["params"]  # the CompVis config's, not user_defined_parameters
        ldm["image_size"] = latent
        unet = ldm.get("unet_config", {}).get("params")
        if unet is not None and "image_size" in unet:
            unet["image_size"] = latent
        model.extra["easynlp"] = {**model.extra["easynlp"], "config": config}


def native_amp_only(flags: ParsedFlags, device: torch.device) -> ParsedFlags:
    """``--use_amp`` on a CPU without native bf16 (no AVX512-BF16/AMX) trains in fp32, with a warning: emulated bf16
    autocast is 7-50x slower than fp32 there (a 64-channel 3x3 convolution: 3.3 s against 0.07 s)."""
    from modelzoo.optimize import cpu_supports_bf16

    if not flags.use_amp or device.type != "cpu" or cpu_supports_bf16():
        return flags
    logger.warning("--use_amp: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 autocast is emulated "
                   "and many times slower than fp32; training in fp32")
    return dataclasses.replace(flags, values={**flags.values, "use_amp": False})


def run(flags: ParsedFlags, params: dict[str, Any]) -> int:
    """Resolve the model and tables, build the task and the trainer, train."""
    if not flags.checkpoint_dir:
        raise UserError("--checkpoint_dir is required for --mode=train (the folder the model is saved to)")
    inputs = input_tables(flags, "train", default_schema=None, max_tables=2, need_image=True)
    settings = TrainingSettings.from_params(params, inputs.tables)
    out = flags.checkpoint_dir
    # a new run, the identical one resumed, or complete already (run.json records the parameters as given)
    decision = runs.decide(flags, params, overwrite=settings.overwrite_checkpoint_dir)
    if decision == "complete":
        return 0
    if decision == "resume" and not flags.resume_from_checkpoint:
        flags = dataclasses.replace(flags, values={**flags.values, "resume_from_checkpoint": out})
    if distributed.context().is_main:
        runs.record(flags, params, finished=False)
    settings.log_notes(logger)
    inputs = dataclasses.replace(inputs, tables=settings.tables_read(inputs.tables))
    model = load_model(settings.pretrain_model_name_or_path, modelzoo_base_dir=flags.modelzoo_base_dir,
                       what="pretrain_model_name_or_path", dtype=settings.base_dtype)
    family = family_of(model)
    if settings.train_target not in family.train_targets:
        trains = (f"they train {', '.join(family.train_targets)}" if family.train_targets
                  else "they cannot be fine-tuned here")
        raise UserError(f"train_target={settings.train_target} is not available for {family.name} models ({trains})")
    if settings.base_precision in lowbit.LOW_BIT:  # before the tables are read: torchao and the device can run it
        lowbit.check_supported(settings.base_precision, model.device)
    flags = native_amp_only(flags, model.device)
    length = text_length(model, flags, settings.text_len)  # EasyNLP's text_len decides over --sequence_length
    resolution = settings.resolution or model.image_size
    if resolution % model.vae_scale_factor:
        raise UserError(f"resolution={resolution} must be a multiple of the VAE factor {model.vae_scale_factor}")
    check_latent_diffusion_training(model, flags, settings, resolution, length)  # the memory plan, before any work
    policy = BadRowPolicy(skip=settings.skip_bad_rows, collect=True)  # every bad row found in one pass
    if settings.train_target == "unet":
        record_native_size(model, resolution)
    data = read_training_data(model, inputs, flags, settings, policy, resolution, length)
    task = build_task(model, settings, data, flags, resolution, length)
    ctx = distributed.context()
    config = TrainerConfig.from_flags(flags, rank=ctx.rank, world_size=ctx.world_size, use_ema=settings.use_ema,
                                      ema_decay=settings.ema_decay, sample_images=settings.sample_images,
                                      sample_time_share=settings.sample_time_share,
                                      optimizer=settings.optimizer, save_optimizer=settings.save_optimizer,
                                      ema_device=settings.ema_device, sharding=settings.sharding,
                                      progress=os.environ.get("EASYNLP_PROGRESS", "1") != "0")
    result = Trainer(config, task).train()
    if distributed.context().is_main:
        runs.record(flags, params, finished=True)
    if settings.train_target == "controlnet":
        logger.info("trained %d steps; ControlNet saved to %s (use it with controlnet=%s in predict, evaluate, serve "
                    "or the Python API, or diffusers' ControlNetModel.from_pretrained)", result["step"], out, out)
        return 0
    if settings.train_target == "lora":
        logger.info("trained %d steps; LoRA adapter saved to %s (use it with lora=%s in predict, evaluate, serve or "
                    "export, or diffusers' pipe.load_lora_weights)", result["step"],
                    os.path.join(out, "pytorch_lora_weights.safetensors"), out)
        return 0
    summary = f"trained {result['step']} steps; model saved to {out}"
    if result["best_val_loss"] is not None:
        summary += f" (best validation loss {result['best_val_loss']:.5f}; last/ holds the final weights)"
    if policy.total:
        summary += f"; {policy.summary()}"
    logger.info(summary)
    if "rrdb" in family.train_targets and not os.path.isfile(os.path.join(out, ESRGAN_NAME)) \
            and distributed.context().is_main:
        logger.warning("%s has no %s: EasyNLP's packaging command (tar czf … config.json pytorch_model.bin %s "
                       "vocab.txt) needs one — copy the ×4 super-resolution weights you use into %s (or %s), or leave "
                       "the file out of the tar command (do_sr is then unavailable)",
                       out, ESRGAN_NAME, ESRGAN_NAME, out, training_advice(is_easynlp_model(model)))
    return 0
