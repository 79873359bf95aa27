"""``--mode=train``: the model and tables resolved, the training task of ``train_target`` built over them
(``train_tasks``), the framework trainer configured from the flags, and its loop run."""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from collections import Counter
from typing import Any

import torch

from appzoo.latent_diffusion import runs
from appzoo.latent_diffusion.data import (
    SMALL_IMAGE_SCALE,
    IndexedTable,
    bucket_sizes,
    choose_bucket,
    index_table,
    is_small,
    kept_share,
)
from appzoo.latent_diffusion.inputs import InputTables, input_tables, text_length
from appzoo.latent_diffusion.loading import load_model
from appzoo.latent_diffusion.losses import DiskLatentCache, LatentCache, module_digest
from appzoo.latent_diffusion.memory_plan import MAX_ENCODE_BATCH, check_latent_diffusion_training
from appzoo.latent_diffusion.train_tasks import (
    CONTROL_COLUMN,
    ControlNetTrainTask,
    DiffusionTrainTask,
    LoraTrainTask,
    RRDBTrainTask,
    VAETrainTask,
)
from easynlp_ldm import distributed
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import BadRowPolicy, table_digest
from easynlp_ldm.trainer import Trainer, TrainerConfig
from modelzoo.esrgan import training_advice
from modelzoo.formats.easynlp import is_easynlp_model
from modelzoo.ldm import ESRGAN_NAME, LatentDiffusion

logger = logging.getLogger("easynlp.train")

BAD_ROWS_FILE = "bad_rows.tsv"


def read_and_encode(path: str, name: str, inputs: InputTables, policy: BadRowPolicy, model: LatentDiffusion,
                    flags: ParsedFlags, encode_batch: int, key: dict, size_of=None, accept=None,
                    extra_images: tuple[str, ...] = ()):
    resolution = key["resolution"]
    """The table indexed (its bad rows found) and its images' VAE latents: read from the run's on-disk latent cache
    when it holds them for exactly this table, VAE and preprocessing, else encoded now and written there."""
    disk = DiskLatentCache(flags.checkpoint_dir, name, {**key, "table": table_digest(path)})
    cached = disk.load()
    if cached is not None:
        table = index_table(path, inputs, policy, accept=accept, extra_images=extra_images)
        if len(cached) == len(table):
            logger.info("%s: latents of its %d images read from %s (none encoded)", path, len(table), disk.path)
            return table, cached
    cache = LatentCache(model, resolution, encode_batch, use_amp=flags.use_amp,
                        size_of=(lambda index, image: size_of(image)) if size_of else None)
    table = index_table(path, inputs, policy, on_image=cache.add, accept=accept, extra_images=extra_images)
    cached = cache.cached()
    if not policy.stopping and distributed.context().is_main:
        disk.save(cached)
        logger.info("%s: %d images encoded; latents cached in %s", path, cache.encoded, disk.path)
    return table, cached


class Buckets:
    """The aspect-ratio buckets of a run (``bucket=True``; otherwise the one square ``resolution``) and what the
    reading pass learns of the images: each image's bucket, the small ones (upscaled more than
    ``SMALL_IMAGE_SCALE``× to their size: warned about, or left out with skip_small_images) and the heavily cropped
    ones (beyond the 4:1 buckets)."""

    def __init__(self, model: LatentDiffusion, resolution: int, params: dict, path: str):
        self.resolution, self.path = resolution, path
        self.enabled = bool(params["bucket"])
        self.skip_small = bool(params["skip_small_images"])
        step = model.vae_scale_factor * 4  # latents a multiple of 4: ≥ 4 latent pixels per step of the UNet
        self.sizes = bucket_sizes(resolution, step) if self.enabled else [(resolution, resolution)]
        self.small: list[tuple[int, tuple[int, int]]] = []  # (line, image size)
        self.cropped: list[tuple[int, float]] = []  # (line, share of pixels kept), below 50 %

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        return choose_bucket(width, height, self.sizes) if self.enabled else self.sizes[0]

    def size_of(self, image) -> tuple[int, int]:
        return self.size_for(*image.size)

    def accept(self, line_number: int, image) -> bool:
        size = self.size_of(image)
        kept = kept_share(*image.size, size)
        if kept < 0.5:
            self.cropped.append((line_number, kept))
        if is_small(*image.size, size):
            self.small.append((line_number, image.size))
            return not self.skip_small
        return True

    def report(self, sizes: list[tuple[int, int]]) -> None:
        counts = Counter(sizes)
        if self.enabled:
            logger.info("aspect-ratio buckets (width×height: images): %s", ", ".join(
                f"{w}×{h}: {counts[(w, h)]}" for w, h in sorted(counts, key=lambda s: s[0] / s[1])))
        if self.small:
            lines = ", ".join(str(line) for line, _ in self.small[:10]) + (" …" if len(self.small) > 10 else "")
            (w, h) = self.small[0][1]
            logger.warning("%s: %d images are far smaller than the training size (upscaled more than %g× per side; "
                           "lines %s; e.g. %d×%d); %s", self.path, len(self.small), SMALL_IMAGE_SCALE, lines, w, h,
                           "left out (skip_small_images=True)" if self.skip_small else
                           "they train as blurred upscales — pass skip_small_images=True to leave them out")
        if self.cropped:
            lines = ", ".join(str(line) for line, _ in self.cropped[:10]) + (" …" if len(self.cropped) > 10 else "")
            how = ("beyond the 4:1 aspect-ratio buckets" if self.enabled else
                   "by the square crop (bucket=True keeps most of each image)")
            logger.warning("%s: %d images lose more than half of their pixels %s (lines %s)", self.path,
                           len(self.cropped), how, lines)


def build_unet_task(model: LatentDiffusion, inputs: InputTables, flags: ParsedFlags, params: dict,
                    policy: BadRowPolicy, resolution: int, text_length: int) -> DiffusionTrainTask:
    random_pixels = params["random_crop"] or params["random_flip"]
    use_cache = params["cache_latents"] and not random_pixels
    if params["cache_latents"] and random_pixels:
        logger.warning("cache_latents is off: random_crop/random_flip change the pixels every epoch")
    encode_batch = min(flags.micro_batch_size, MAX_ENCODE_BATCH)  # the memory plan counts this many per VAE call
    tables = inputs.tables
    buckets = Buckets(model, resolution, params, tables[0])
    logger.info("reading %s%s", tables[0], " and caching VAE latents" if use_cache else "")
    extra = (CONTROL_COLUMN,) if params["train_target"] == "controlnet" else ()
    if extra and CONTROL_COLUMN not in inputs.names:
        raise UserError(f"train_target=controlnet needs a conditioning-image column named '{CONTROL_COLUMN}' in "
                        f"--input_schema (base64 images, like {inputs.image_column}), e.g. "
                        f"idx:str:1,text:str:1,{inputs.image_column}:str:1,{CONTROL_COLUMN}:str:1")
    key = {"vae": module_digest(model.vae), "device": model.vae.device.type, "dtype": str(model.vae.dtype),
           "use_amp": flags.use_amp, "encode_batch": encode_batch, "resolution": resolution,
           "skip_first_line": inputs.skip_first_line, "schema": [c.name for c in inputs.schema],
           "columns": [inputs.text_column, inputs.image_column], "skip_bad_rows": policy.skip}
    if use_cache:
        train, cached = read_and_encode(tables[0], "train", inputs, policy, model, flags, encode_batch, {
            **key, "buckets": buckets.sizes, "skip_small_images": buckets.skip_small}, buckets.size_of, buckets.accept,
            extra)
    else:
        train, cached = index_table(tables[0], inputs, policy, accept=buckets.accept, extra_images=extra), None
    val, val_cached = None, None
    if len(tables) == 2:  # validated on square centre crops: its loss compares across runs and bucket settings
        val, val_cached = read_and_encode(tables[1], "val", inputs, policy, model, flags, encode_batch, key,
                                          extra_images=extra)
    check_reading_pass(policy, flags.checkpoint_dir, train, val)
    sizes = [buckets.size_for(*size) for size in train.sizes]
    buckets.report(sizes)
    val_captions, val_moments = [], None
    if val is not None:
        val_captions, val_moments = val.captions, val_cached.batch(list(range(len(val_cached))))
    data_threads = flags.data_threads if not use_cache else 0
    if use_cache and "data_threads" in flags.given:
        logger.warning("--data_threads has no effect with cached latents (nothing is decoded during training)")
    task_class = {"lora": LoraTrainTask, "controlnet": ControlNetTrainTask}.get(params["train_target"],
                                                                            DiffusionTrainTask)
    return task_class(model, train, cached, val_captions, val_moments,
                      params=params, seed=flags.random_seed, resolution=resolution, text_length=text_length,
                      data_threads=min(data_threads, os.cpu_count() or 1), use_amp=flags.use_amp, sizes=sizes,
                      val_table=val)


def build_component_task(target: str, model: LatentDiffusion, inputs: InputTables, flags: ParsedFlags, params: dict,
                         policy: BadRowPolicy, resolution: int):
    logger.info("reading %s (train_target=%s)", inputs.tables[0], target)
    train = index_table(inputs.tables[0], inputs, policy)
    val = index_table(inputs.tables[1], inputs, policy) if len(inputs.tables) == 2 else None
    check_reading_pass(policy, flags.checkpoint_dir, train, val)
    if target in ("vae", "vae_decoder"):
        return VAETrainTask(model, train, val, params, flags.random_seed, resolution,
                            decoder_only=target == "vae_decoder")
    return RRDBTrainTask(model, train, val, params, flags.random_seed)


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
        params = config["model"]["params"]
        params["image_size"] = latent
        unet_params = params.get("unet_config", {}).get("params")
        if unet_params is not None and "image_size" in unet_params:
            unet_params["image_size"] = latent
        model.extra["easynlp"] = {**model.extra["easynlp"], "config": config}


def report_bad_rows(policy: BadRowPolicy, out: str) -> None:
    """After the reading pass: every bad row in ``<checkpoint_dir>/bad_rows.tsv`` (the first ones on screen), then a
    stop — or, with skip_bad_rows, the count. A bad_rows.tsv of an earlier run is removed when there are none."""
    report = os.path.join(out, BAD_ROWS_FILE)
    if not distributed.context().is_main:
        policy.finish(None, logger.debug)  # rank 0 writes and shows; every rank stops alike
        return
    if not policy.total and os.path.isfile(report):
        os.remove(report)
    policy.finish(report, logger.warning)
    if policy.total:
        logger.warning("%s (listed in %s)", policy.summary(), report)


def check_reading_pass(policy: BadRowPolicy, out: str, train: IndexedTable, val: IndexedTable | None) -> None:
    """After the tables are read and before anything is built on them: the bad rows reported (a stop, unless
    skipping them), then a table left without rows is an error naming it."""
    report_bad_rows(policy, out)
    for table, use in ((train, "train"), (val, "validate")):
        if table is not None and not len(table):
            raise UserError(f"{table.path}: no rows left to {use} on (the table has no data rows, or every row was "
                            f"left out: see the lines above)")


def crop_mode(params: dict[str, Any]) -> dict[str, Any]:
    """center_crop=False means a random crop, as in diffusers' scripts (``--center_crop`` unset: random crops)."""
    if params["center_crop"] or params["random_crop"]:
        return params
    logger.info("center_crop=False: images are cropped at a seeded random position (random_crop=True)")
    return {**params, "random_crop": True}


def easynlp_training_keys(params: dict[str, Any], inputs: InputTables) -> tuple[dict[str, Any], InputTables]:
    """EasyNLP's training keys whose meaning differs from ours, mapped explicitly: ``do_eval=False`` drops the
    validation table; ``not_use_gradient_checkpoint`` is the inverse of ``gradient_checkpointing``. (``size`` is an
    alias of ``resolution``; ``text_len`` is read where the text length is chosen.)"""
    params = dict(params)
    if not params["do_eval"] and len(inputs.tables) == 2:
        logger.warning("do_eval=False: no validation; %s is not read, and the top-level checkpoint is the last one",
                       inputs.tables[1])
        inputs = dataclasses.replace(inputs, tables=inputs.tables[:1])
    not_use = params["not_use_gradient_checkpoint"]
    if not_use is not None:
        if not_use and params["gradient_checkpointing"]:
            raise UserError("not_use_gradient_checkpoint=True contradicts gradient_checkpointing=True; give one")
        if not_use:
            logger.info("not_use_gradient_checkpoint=True: gradient checkpointing stays off (the default here)")
        params["gradient_checkpointing"] = not not_use
    return params, inputs


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
    out = flags.checkpoint_dir
    given_params = params
    decision = runs.decide(flags, params)  # a new run, the identical one resumed, or complete already
    if decision == "complete":
        return 0
    if decision == "resume" and not flags.resume_from_checkpoint:
        flags = dataclasses.replace(flags, values={**flags.values, "resume_from_checkpoint": out})
    if distributed.context().is_main:
        runs.record(flags, given_params, finished=False)
    params, inputs = easynlp_training_keys(params, inputs)
    params = crop_mode(params)
    model = load_model(params["pretrain_model_name_or_path"], modelzoo_base_dir=flags.modelzoo_base_dir,
                       what="pretrain_model_name_or_path")
    flags = native_amp_only(flags, model.unet.device)
    length = text_length(model, flags, params["text_len"])  # EasyNLP's text_len decides over --sequence_length
    resolution = params["resolution"] or model.image_size
    if resolution % model.vae_scale_factor:
        raise UserError(f"resolution={resolution} must be a multiple of the VAE factor {model.vae_scale_factor}")
    check_latent_diffusion_training(model, flags, params, resolution, length)  # the memory plan, before any work
    policy = BadRowPolicy(skip=params["skip_bad_rows"], collect=True)  # every bad row found in one pass
    if params["train_target"] in ("unet", "lora", "controlnet"):
        if params["train_target"] == "unet":
            record_native_size(model, resolution)
        task = build_unet_task(model, inputs, flags, params, policy, resolution, length)
    else:
        task = build_component_task(params["train_target"], model, inputs, flags, params, policy, resolution)
    ctx = distributed.context()
    config = TrainerConfig.from_flags(flags, rank=ctx.rank, world_size=ctx.world_size, use_ema=params["use_ema"],
                                      ema_decay=params["ema_decay"], sample_images=params["sample_images"],
                                      sample_time_share=params["sample_time_share"],
                                      optimizer=params["optimizer"], save_optimizer=params["save_optimizer"],
                                      ema_device=params["ema_device"],
                                      progress=os.environ.get("EASYNLP_PROGRESS", "1") != "0")
    result = Trainer(config, task).train()
    if distributed.context().is_main:
        runs.record(flags, given_params, finished=True)
    if params["train_target"] == "controlnet":
        logger.info("trained %d steps; ControlNet saved to %s (use it with controlnet=%s in predict, evaluate, serve "
                    "or the Python API, or diffusers' ControlNetModel.from_pretrained)", result["step"], out, out)
        return 0
    if params["train_target"] == "lora":
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
    if not os.path.isfile(os.path.join(out, ESRGAN_NAME)) and distributed.context().is_main:
        logger.warning("%s has no %s: EasyNLP's packaging command (tar czf … config.json pytorch_model.bin %s "
                       "vocab.txt) needs one — copy the ×4 super-resolution weights you use into %s (or %s), or leave "
                       "the file out of the tar command (do_sr is then unavailable)",
                       out, ESRGAN_NAME, ESRGAN_NAME, out, training_advice(is_easynlp_model(model)))
    return 0
