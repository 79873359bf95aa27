"""The training loop: optimiser, LR schedule, accumulation, AMP, EMA, atomic checkpoints, exact resume, tqdm and
TensorBoard. It knows nothing of diffusion: an app hands it a ``TrainTask``.

Exactness: the data order of every epoch is a permutation drawn from (seed, epoch), and every per-sample random
choice is the task's business, derived from (seed, epoch, sample index). The training state saved beside each
checkpoint (raw weights, optimiser, LR schedule, EMA, step, epoch, position in the epoch, RNG states) lets
``--resume_from_checkpoint`` continue exactly where the saved state left off.

Checkpoint folder (``--checkpoint_dir``):
  config.json, pytorch_model.bin, vocab.txt, … — the best checkpoint by validation loss (the last one when there is
                                                 no validation table); what predict and serve load by default
  last/                                        — the most recent checkpoint, same files
  checkpoint-STEP/                             — every checkpoint, with --save_all_checkpoints
  training_state/                              — what resume needs; swapped in atomically
  log/                                         — TensorBoard event files
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from easynlp_ldm.errors import UserError

logger = logging.getLogger("easynlp.trainer")

STATE_DIR = "training_state"
STATE_FILE = "state.pt"
META_FILE = "trainer_meta.json"


@dataclass
class TrainerConfig:
    output_dir: str
    learning_rate: float = 5e-5
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    optimizer_type: str = "AdamW"
    warmup_proportion: float = 0.1
    epoch_num: float = 3.0
    micro_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    logging_steps: int = 100
    save_checkpoint_steps: int | None = None
    save_all_checkpoints: bool = False
    use_amp: bool = False
    seed: int = 1234
    use_ema: bool = True
    ema_decay: float = 0.999
    resume_from: str | None = None
    progress: bool = True
    rank: int = 0
    world_size: int = 1


class TrainTask(Protocol):
    """What an app provides to the trainer."""

    def trainable_modules(self) -> dict[str, torch.nn.Module]: ...

    def num_examples(self) -> int: ...

    def batches(self, order: list[list[int]], epoch: int): ...  # yields one batch per list of sample indices

    def loss(self, batch: Any) -> torch.Tensor: ...

    def validate(self) -> float | None: ...

    def save_model(self, folder: str, weights: dict[str, torch.Tensor]) -> list[str] | None: ...
    # returns the files written (lets the trainer hard-link last/ to an identical checkpoint instead of rewriting)

    def sample_images(self) -> list[tuple[str, Any]]: ...  # (caption, PIL image) for TensorBoard


def amp_dtype(device: torch.device) -> torch.dtype:
    """What ``--use_amp`` autocasts to: bf16 on CPU and on GPUs that have it, fp16 (with a grad scaler) otherwise."""
    return torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16


def _link_files(files: list[str] | None, folder: str) -> bool:
    """Hard-link ``files`` into ``folder``, each replacing its namesake atomically. False (and nothing half done
    that matters: the caller writes the folder in full) where the file system has no hard links."""
    if not files:
        return False
    os.makedirs(folder, exist_ok=True)
    try:
        for path in files:
            target = os.path.join(folder, os.path.basename(path))
            tmp = f"{target}.link.{os.getpid()}"
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.link(path, tmp)
            os.replace(tmp, target)
    except OSError as err:
        logger.debug("hard links into %s failed (%s); writing it in full", folder, err)
        return False
    return True


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    lowered = name.lower()
    return param.ndim <= 1 or lowered.endswith(".bias") or "norm" in lowered


def build_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], config: TrainerConfig):
    decay = [p for n, p in named_params if not _no_decay(n, p)]
    no_decay = [p for n, p in named_params if _no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kind = config.optimizer_type
    # The fused kernels are several times faster than foreach on CPU; same update rule.
    fused = all(p.dtype == torch.float32 and p.device.type in ("cpu", "cuda") for _, p in named_params)
    if kind in ("AdamW", "BertAdam"):
        return torch.optim.AdamW(groups, lr=config.learning_rate, fused=fused)
    if kind == "Adam":
        # torch's Adam adds weight decay to the gradient (L2), as EasyNLP's Adam did.
        return torch.optim.Adam(groups, lr=config.learning_rate, fused=fused)
    if kind == "SGD":
        return torch.optim.SGD(groups, lr=config.learning_rate, momentum=0.9)
    raise UserError(f"--optimizer_type={kind} is not supported (AdamW, Adam, SGD)")


def linear_warmup_decay(total_steps: int, warmup_proportion: float):
    warmup = int(total_steps * warmup_proportion)

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        remaining = max(1, total_steps - warmup)
        return max(0.0, (total_steps - step) / remaining)

    return factor


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def _json_rng(state: dict) -> dict:
    # python/numpy RNG states hold tuples/arrays; keep them loadable with weights_only=True by storing lists.
    py = state["python"]
    np_state = state["numpy"]
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], torch.as_tensor(np_state[1]), np_state[2], np_state[3], np_state[4]],
            "torch": state["torch"]}


def _unjson_rng(state: dict) -> dict:
    py = state["python"]
    np_state = state["numpy"]
    return {"python": (py[0], tuple(py[1]), py[2]),
            "numpy": (np_state[0], np_state[1].numpy(), np_state[2], np_state[3], np_state[4]),
            "torch": state["torch"]}


def find_training_state(path: str) -> str:
    """``--resume_from_checkpoint`` may name the checkpoint folder or its training_state/ folder."""
    for candidate in (path, os.path.join(path, STATE_DIR), os.path.join(path, STATE_DIR + ".old")):
        if os.path.isfile(os.path.join(candidate, STATE_FILE)):
            return candidate
    raise UserError(f"--resume_from_checkpoint={path}: no training state there (expected {STATE_DIR}/{STATE_FILE}; "
                    f"it is written at every --save_checkpoint_steps)")


def _write_failure(err: OSError, what: str, keep: str) -> UserError:
    if err.errno == errno.ENOSPC:
        return UserError(f"disk full while saving {what}; the last complete checkpoint in {keep} is intact — free "
                         f"space and rerun with --resume_from_checkpoint={keep}")
    return UserError(f"cannot save {what} ({err.strerror or err}); the last complete checkpoint in {keep} is intact")


class Trainer:
    def __init__(self, config: TrainerConfig, task: TrainTask):
        self.config = config
        self.task = task
        self.is_main = config.rank == 0
        modules = task.trainable_modules()
        self.named_params = [(f"{prefix}.{n}", p) for prefix, module in modules.items()
                             for n, p in module.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise UserError("nothing to train: every component is frozen")
        self.params = [p for _, p in self.named_params]
        self.optimizer = build_optimizer(self.named_params, config)
        n = task.num_examples()
        if n == 0:
            raise UserError("the training table has no usable rows")
        per_step = config.micro_batch_size * config.world_size
        self.micro_batches_per_epoch = math.ceil(n / per_step)
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / config.gradient_accumulation_steps)
        self.total_steps = max(1, math.ceil(config.epoch_num * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_warmup_decay(self.total_steps, config.warmup_proportion))
        self.ema = None
        if config.use_ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=config.ema_decay, foreach=True)
        self.step = 0
        self.epoch = 0
        self.micro_position = 0  # micro-batches of the current epoch already consumed
        self.best_loss: float | None = None
        self.writer = None
        self.amp_dtype = amp_dtype(self.params[0].device) if config.use_amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    # --------------------------------------------------------------------------------------------- state
    def weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.named_params}

    def ema_weights(self) -> dict[str, torch.Tensor]:
        if self.ema is None:
            return self.weights()
        return {name: shadow.detach().clone() for (name, _), shadow in zip(self.named_params, self.ema.shadow_params)}

    def _state(self) -> dict:
        return {
            "step": self.step, "epoch": self.epoch, "micro_position": self.micro_position,
            "sample_position": self.micro_position * self.config.micro_batch_size * self.config.world_size,
            "best_loss": self.best_loss, "total_steps": self.total_steps,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": _json_rng(_rng_state()),
            "weights": self.weights(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def save_training_state(self) -> None:
        folder = os.path.join(self.config.output_dir, STATE_DIR)
        tmp, old = folder + ".tmp", folder + ".old"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        torch.save(self._state(), os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as handle:
            json.dump({"step": self.step, "epoch": self.epoch, "micro_position": self.micro_position,
                       "total_steps": self.total_steps, "seed": self.config.seed}, handle)
        # Swap: a kill between the renames leaves .old, which find_training_state also accepts.
        if os.path.isdir(folder):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)

    def load_training_state(self, path: str) -> None:
        folder = find_training_state(path)
        try:
            state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
        except Exception as err:
            raise UserError(f"{folder}/{STATE_FILE}: cannot read the training state ({type(err).__name__})") \
                from None
        names = {name for name, _ in self.named_params}
        if set(state["weights"]) != names:
            raise UserError(f"{folder}: the training state was saved for other trainable parts (e.g. a different "
                            f"train_text_encoder setting); resume with the same settings")
        with torch.no_grad():
            for name, param in self.named_params:
                param.copy_(state["weights"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise UserError(f"{folder}: saved without EMA; resume with use_ema=False or start afresh")
            self.ema.load_state_dict(state["ema"])
            self.ema.to(device=self.params[0].device)  # the state was read onto the CPU; the weights may be on a GPU
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        global_micro = self.config.micro_batch_size * self.config.world_size
        position = int(state.get("sample_position", state["micro_position"] * global_micro))
        self.micro_position = position // global_micro
        self.best_loss = state["best_loss"]
        if int(state["total_steps"]) != self.total_steps:
            logger.warning("the run now has %d optimiser steps in all (the saved run had %d): the LR schedule "
                           "continues from step %d", self.total_steps, state["total_steps"], self.step)
        _set_rng_state(_unjson_rng(state["rng"]))
        logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", folder, self.step, self.epoch,
                    self.micro_position)

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, val_loss: float | None) -> None:
        out = self.config.output_dir
        weights = self.ema_weights()
        last = os.path.join(out, "last")
        try:
            improved = val_loss is None or self.best_loss is None or val_loss < self.best_loss
            if improved:  # the best is also the last: written once, last/ gets hard links to the same files
                if val_loss is not None:
                    self.best_loss = val_loss
                if not _link_files(self.task.save_model(out, weights), last):
                    self.task.save_model(last, weights)
            else:
                self.task.save_model(last, weights)
            if self.config.save_all_checkpoints:
                self.task.save_model(os.path.join(out, f"checkpoint-{self.step}"), weights)
            self.save_training_state()
        except OSError as err:
            raise _write_failure(err, f"the checkpoint at step {self.step}", out) from None
        logger.info("step %d: checkpoint saved to %s%s", self.step, out,
                    "" if improved else f" (last/ only; best validation loss stays {self.best_loss:.5f})")

    # ------------------------------------------------------------------------------------------- logging
    def _open_writer(self):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(os.path.join(self.config.output_dir, "log"), purge_step=self.step or None)

    def _validate_and_save(self) -> float | None:
        from easynlp_ldm import distributed

        if not self.is_main:
            distributed.barrier()  # rank 0 validates and writes; the others wait for it
            return None
        try:
            return self._validate_and_save_main()
        finally:
            distributed.barrier()

    def _validate_and_save_main(self) -> float | None:
        if self.ema is not None:  # judge (and show) the weights that get saved: the EMA
            self.ema.store(self.params)
            self.ema.copy_to(self.params)
        try:
            val_loss = self.task.validate()
            samples = self.task.sample_images() if self.writer else []
        finally:
            if self.ema is not None:
                self.ema.restore(self.params)
        if val_loss is not None:
            logger.info("step %d: validation loss %.5f", self.step, val_loss)
            if self.writer:
                self.writer.add_scalar("val/loss", val_loss, self.step)
        if self.writer:
            for i, (caption, image) in enumerate(samples):
                array = np.asarray(image)
                self.writer.add_image(f"samples/{i}", array, self.step, dataformats="HWC")
                self.writer.add_text(f"samples/{i}/caption", caption, self.step)
            self.writer.flush()
        self.save_checkpoint(val_loss)
        return val_loss

    # ---------------------------------------------------------------------------------------------- loop
    def _micro_batches(self, epoch: int) -> list[tuple[list[int], int]]:
        """(this rank's sample indices, the global micro-batch size) for every global micro-batch of the epoch:
        the same global batches whatever the world size, each rank taking its slice."""
        order = epoch_order(self.task.num_examples(), self.config.seed, epoch)
        size = self.config.micro_batch_size * self.config.world_size
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        rank, micro = self.config.rank, self.config.micro_batch_size
        return [(b[rank * micro:(rank + 1) * micro], len(b)) for b in batches]

    def train(self) -> dict:
        config = self.config
        os.makedirs(config.output_dir, exist_ok=True)
        if config.resume_from:
            self.load_training_state(config.resume_from)
        if self.is_main:
            self._open_writer()
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (config.progress and self.is_main),
                   unit="step", dynamic_ncols=True)
        accum = config.gradient_accumulation_steps
        window_start, window_images = time.time(), 0
        while self.step < self.total_steps:
            micro_batches = self._micro_batches(self.epoch)
            start = self.micro_position
            batch_iter = iter(self.task.batches([m for m, _ in micro_batches[start:] if m], self.epoch))
            groups = [list(range(i, min(i + accum, len(micro_batches)))) for i in range(0, len(micro_batches), accum)]
            for group in groups:
                if group[0] < start:
                    continue
                if self.step >= self.total_steps:
                    break
                batches = [(next(batch_iter) if micro_batches[i][0] else None, len(micro_batches[i][0]),
                            micro_batches[i][1]) for i in group]
                loss_value, images = self._optimiser_step(batches)
                self.micro_position = group[-1] + 1
                window_images += images * config.world_size
                lr = self.scheduler.get_last_lr()[0]
                elapsed = max(time.time() - window_start, 1e-9)
                speed = window_images / elapsed
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
                if self.writer:
                    self.writer.add_scalar("train/loss", loss_value, self.step)
                    self.writer.add_scalar("train/lr", lr, self.step)
                    self.writer.add_scalar("train/grad_norm", self.last_grad_norm, self.step)
                    self.writer.add_scalar("train/images_per_sec", speed, self.step)
                if self.step % config.logging_steps == 0 and self.is_main:
                    logger.info("step %d/%d epoch %d: loss %.5f lr %.3e grad_norm %.3f %.1f images/s", self.step,
                                self.total_steps, self.epoch, loss_value, lr, self.last_grad_norm, speed)
                    window_start, window_images = time.time(), 0
                if config.save_checkpoint_steps and self.step % config.save_checkpoint_steps == 0 \
                        and self.step < self.total_steps:
                    self._validate_and_save()
            if self.step >= self.total_steps and self.micro_position < len(micro_batches):
                break
            self.epoch += 1
            self.micro_position = 0
        bar.close()
        last_val = self._validate_and_save()
        if self.writer:
            self.writer.close()
        return {"step": self.step, "val_loss": last_val, "best_val_loss": self.best_loss}

    def _optimiser_step(self, micro_batches: list[tuple[Any, int, int]]) -> tuple[float, int]:
        """One optimiser step over a group of micro-batches. Each rank's loss is weighted by its share of the global
        micro-batch, so summing gradients over ranks gives exactly the single-process gradient."""
        from easynlp_ldm import distributed

        total, images = 0.0, 0
        for batch, size, global_size in micro_batches:
            if batch is None:  # this rank's slice of a short last batch is empty
                continue
            weight = size / global_size / len(micro_batches)
            with torch.autocast(self.params[0].device.type, dtype=self.amp_dtype,
                                enabled=self.amp_dtype is not None):
                loss = self.task.loss(batch)
            if not torch.isfinite(loss):
                raise UserError(f"loss is {loss.item()} at step {self.step + 1} (epoch {self.epoch}); stopped "
                                f"without saving. Lower --learning_rate or check the data; the last good "
                                f"checkpoint in {self.config.output_dir} is intact")
            scaled = loss * weight
            if self.scaler is not None:
                self.scaler.scale(scaled).backward()
            else:
                scaled.backward()
            total += loss.item() / len(micro_batches)
            images += size
        distributed.average_gradients(self.params)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm and self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        else:
            norm = torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        self.last_grad_norm = float(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        self.step += 1
        return total, images
