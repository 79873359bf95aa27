"""The training loop: optimiser, LR schedule, accumulation, AMP, EMA, atomic checkpoints, exact resume, tqdm and
TensorBoard. It knows nothing of diffusion: an app hands it a ``TrainTask``.

Exactness: the data order of every epoch is a permutation drawn from (seed, epoch), and every per-sample random
choice is the task's business, derived from (seed, epoch, sample index). The training state saved beside each
checkpoint (raw weights, optimiser, LR schedule, EMA, step, epoch, position in the epoch, RNG states) lets
``--resume_from_checkpoint`` continue exactly where the saved state left off: before the loop starts, the saved
(epoch, micro-batch position) becomes a plan of the remaining optimiser steps (``Trainer.plan``), which the loop
then simply runs.

Several processes: the trainable modules run inside one ``DistributedDataParallel`` (gradients all-reduced in
buckets while the backward pass goes on, once per optimiser step); each rank trains on its slice of the same global
micro-batches a single process would see, weighted so that the result is the single-process gradient. With
``sharding=fsdp`` they are sharded per block instead (``sharding.py``): the same slices and weights, gradients
reduce-scattered, the optimiser and the EMA on each rank's shards; validation and sample images run on every rank
(their forward passes gather each block), checkpoints are gathered whole, one tensor at a time, and written by rank
0; the training state is a distributed checkpoint that any number of processes resumes.

The checkpoint folder and the training state (saving, loading, the RNG states) are ``training_state.py``'s.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any, Protocol

import numpy as np
import torch

from easynlp_ldm import sharding
from easynlp_ldm.args import FLAGS_BY_DEST, ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.training_state import (
    load_sharded_state,
    load_state,
    rng_state,
    save_model_files,
    save_sharded_state,
    save_state,
    set_rng_state,
    write_failure,
)

logger = logging.getLogger("easynlp.trainer")

_clock = time.monotonic  # what the sampling budget is measured with (tests substitute a fake clock)


@dataclass(frozen=True)
class TrainerConfig:
    """The trainer's settings. Fields named after a flag come from that flag (``from_flags``): their defaults are
    declared once, in ``easynlp_ldm.args.FLAGS``; none is restated here."""

    # From the flags.
    checkpoint_dir: str
    resume_from_checkpoint: str | None
    learning_rate: float
    weight_decay: float
    max_grad_norm: float
    optimizer_type: str
    warmup_proportion: float
    epoch_num: float
    micro_batch_size: int
    gradient_accumulation_steps: int
    logging_steps: int
    save_checkpoint_steps: int | None
    save_all_checkpoints: bool
    use_amp: bool
    random_seed: int
    # From the app and the process group.
    use_ema: bool
    ema_decay: float
    rank: int
    world_size: int
    progress: bool
    sample_images: int  # images generated for TensorBoard at each checkpoint (0: none)
    sample_time_share: float  # the largest share of the training wall time those images may take
    # Memory options (the app's user-defined parameters; easynlp_ldm/memory.py estimates what they save).
    optimizer: str  # adamw: the one --optimizer_type names; adafactor: factored second moments, no first moment
    save_optimizer: bool  # False: the training state holds no optimiser state (resume restarts the optimiser)
    ema_device: str  # "": the EMA lives with the weights; "cpu": in RAM, whatever the training device
    sharding: str  # none: each process holds the whole model (DDP); fsdp: sharded per block (sharding.py)

    @classmethod
    def from_flags(cls, flags: ParsedFlags, **app_settings: Any) -> TrainerConfig:
        """Every field named after a flag read from ``flags``; the others (use_ema, ema_decay, rank, world_size,
        progress, sample_images, sample_time_share, optimizer, save_optimizer, ema_device, sharding) given as
        keyword arguments. A missing or unknown one is a
        ``TypeError``, as for any call."""
        from_flags = {f.name: getattr(flags, f.name) for f in fields(cls) if f.name in FLAGS_BY_DEST}
        clash = sorted(set(from_flags) & set(app_settings))
        if clash:
            raise TypeError(f"TrainerConfig.from_flags: {', '.join(clash)} come from the flags")
        return cls(**from_flags, **app_settings)


class TrainTask(Protocol):
    """What an app provides to the trainer."""

    def trainable_modules(self) -> dict[str, torch.nn.Module]: ...

    def num_examples(self) -> int: ...

    def batches(self, order: list[list[int]], epoch: int): ...  # yields one batch per list of sample indices

    def loss(self, batch: Any) -> torch.Tensor: ...

    def validate(self) -> float | None: ...

    def save_model(self, folder: str, weights: dict[str, torch.Tensor]) -> list[str] | None: ...
    # returns the files written (lets the trainer hard-link last/ to an identical checkpoint instead of rewriting)

    def sample_images(self, count: int) -> list[tuple[str, Any]]: ...  # up to count (caption, PIL image), TensorBoard

    # Optional: ``groups()``, a hashable per example (e.g. its aspect-ratio bucket); each micro-batch then comes from
    # one group (``Trainer.global_batches``). ``shard_units()``: the blocks of the trainable modules that
    # sharding=fsdp shards one by one (without it, the task cannot train sharded); ``unsharded_parameters()``: frozen
    # parameters inside them that stay whole in every process (a low-bit base's quantised weights).


def amp_dtype(device: torch.device) -> torch.dtype:
    """What ``--use_amp`` autocasts to: bf16 on CPU and on GPUs that have it, fp16 (with a grad scaler) otherwise."""
    return torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16


def sampling_refusal(spent: float, seconds_per_image: float | None, count: int, elapsed: float,
                     share: float) -> str | None:
    """Why ``count`` sample images are not generated now, or None when they are: they would take an estimated
    ``seconds_per_image × count`` (measured at the last sampling; the first sampling, with nothing measured yet, is
    always allowed) and bring the sampling time of the run, ``spent`` so far, above ``share`` of its wall time
    ``elapsed`` (plus the estimate: the wall time once they are done)."""
    if seconds_per_image is None:
        return None
    estimate = seconds_per_image * count
    if spent + estimate <= share * (elapsed + estimate):
        return None
    return (f"{count} would take about {estimate:.1f} s ({seconds_per_image:.1f} s each last time), bringing the "
            f"sampling time to {spent + estimate:.1f} s of {elapsed + estimate:.1f} s of training, over "
            f"sample_time_share={share:g}")


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    lowered = name.lower()
    return param.ndim <= 1 or lowered.endswith(".bias") or "norm" in lowered


def build_optimizer(named_params: list[tuple[str, torch.nn.Parameter]], config: TrainerConfig):
    decay = [p for n, p in named_params if not _no_decay(n, p)]
    no_decay = [p for n, p in named_params if _no_decay(n, p)]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if config.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # Factored second moments (a row and a column vector per matrix), no first moment (beta1=None), at the
        # given learning rate and schedule: neither the relative step size nor the parameter-scale rescaling.
        return Adafactor(groups, lr=config.learning_rate, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if config.optimizer != "adamw":
        raise UserError(f"optimizer={config.optimizer} is not supported (adamw, adafactor)")
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


class TaskLoss(torch.nn.Module):
    """The task's trainable modules as one module whose forward is the task's loss: what DistributedDataParallel
    wraps, so that its hooks see every trainable parameter. The task itself is not a submodule (only its loss
    method is kept): frozen parts (the VAE, a frozen text encoder) stay out of DDP."""

    def __init__(self, task: TrainTask):
        super().__init__()
        self.parts = torch.nn.ModuleDict(task.trainable_modules())
        self.task_loss = task.loss

    def forward(self, batch: Any) -> torch.Tensor:
        return self.task_loss(batch)


@dataclass(frozen=True)
class MicroBatch:
    """This rank's part of one global micro-batch: the sample indices it runs, how many of them count (``size``;
    0 for a stand-in, see ``Trainer._micro_batches``) and the global micro-batch's size."""

    indices: list[int]
    size: int
    global_size: int


@dataclass(frozen=True)
class PlannedStep:
    """One optimiser step of the plan: its micro-batches, and the epoch's micro-batch position once it is done."""

    micro_batches: list[MicroBatch]
    end: int


class Trainer:
    def __init__(self, config: TrainerConfig, task: TrainTask):
        from easynlp_ldm import distributed

        self.config = config
        self.task = task
        self.is_main = config.rank == 0
        self.net = TaskLoss(task)
        self.sharded = config.sharding == "fsdp"
        if self.sharded:
            self._shard()
        self.named_params = [(name, p) for name, p in self.net.parts.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise UserError("nothing to train: every component is frozen")
        self.params = [p for _, p in self.named_params]
        # Several processes: DDP all-reduces the gradients during the backward pass of each step's last micro-batch
        # (sharded, each block reduce-scatters its own).
        self.model = distributed.data_parallel(self.net) if config.world_size > 1 and not self.sharded else self.net
        self.optimizer = build_optimizer(self.named_params, config)
        n = task.num_examples()
        if n == 0:
            raise UserError("the training table has no usable rows")
        groups = getattr(task, "groups", None)
        groups = groups() if groups is not None else None
        # Batches come from one group (an aspect-ratio bucket) each; one group is the same as none.
        self.groups = groups if groups is not None and len(set(groups)) > 1 else None
        self.micro_batches_per_epoch = len(self.global_batches(0))  # the same count every epoch
        self.steps_per_epoch = math.ceil(self.micro_batches_per_epoch / config.gradient_accumulation_steps)
        self.total_steps = max(1, math.ceil(config.epoch_num * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, linear_warmup_decay(self.total_steps, config.warmup_proportion))
        self.ema = None
        if config.use_ema:
            from diffusers.training_utils import EMAModel

            # Sharded: the shadow weights are DTensors like the weights (torch has no sharded _foreach_copy_).
            self.ema = EMAModel(self.params, decay=config.ema_decay, foreach=not self.sharded)
            if self._ema_on_host():
                self.ema.to(device="cpu")
        self.step = 0
        self.epoch = 0
        self.micro_position = 0  # micro-batches of the current epoch already consumed
        self.best_loss: float | None = None
        self.last_grad_norm = 0.0
        self.writer = None
        self.started = _clock()  # the run's wall time is counted from here (reset when train() starts)
        self.sampling_seconds = 0.0  # spent generating sample images
        self.seconds_per_image: float | None = None  # measured at the last sampling
        self.amp_dtype = amp_dtype(self.params[0].device) if config.use_amp else None
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    def _shard(self) -> None:
        """The trainable modules sharded per block across the process group (a group of one in a single process)."""
        from easynlp_ldm import distributed

        units = getattr(self.task, "shard_units", None)
        if units is None:
            raise UserError("sharding=fsdp is not available for this train_target (it names no blocks to shard); "
                            "use sharding=none")
        if self.config.ema_device == "cpu":
            raise UserError("ema_device=cpu does not combine with sharding=fsdp (the EMA is sharded like the weights, "
                            "1/N per process)")
        device = next(self.net.parameters()).device
        if self.config.world_size == 1:
            distributed.process_group_of_one(device)
        sharding.return_freed_buffers(device)
        whole = getattr(self.task, "unsharded_parameters", set)()
        sharding.shard(self.net.parts.values(), units(), device, whole)

    # --------------------------------------------------------------------------------------------- state
    def _ema_on_host(self) -> bool:
        """``ema_device=cpu`` while the weights are elsewhere (on a CPU run the EMA is in RAM anyway)."""
        return self.config.ema_device == "cpu" and self.params[0].device.type != "cpu"

    def _ema_step(self) -> None:
        if not self._ema_on_host():
            self.ema.step(self.params)
            return
        # Shadow in RAM, weights on the GPU: one parameter at a time (no second copy of the weights on either side).
        ema = self.ema
        ema.optimization_step += 1
        decay = ema.get_decay(ema.optimization_step)
        ema.cur_decay_value = decay
        with torch.no_grad():
            for shadow, param in zip(ema.shadow_params, self.params):
                shadow.lerp_(param.detach().to(shadow.device), 1 - decay)

    # Views of the live tensors, not copies: they are only read (saved) before the next step changes them, and a
    # copy would cost a second instance of the trained weights in memory at every checkpoint.
    def weights(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_params}

    def ema_weights(self) -> dict[str, torch.Tensor]:
        if self.ema is None:
            return self.weights()
        return {name: shadow.detach() for (name, _), shadow in zip(self.named_params, self.ema.shadow_params)}

    def _position_state(self) -> dict:
        """The training state but for the weights, the optimiser and the EMA."""
        return {
            "step": self.step, "epoch": self.epoch, "micro_position": self.micro_position,
            "sample_position": sum(len(b) for b in self.global_batches(self.epoch)[:self.micro_position]),
            "best_loss": self.best_loss, "total_steps": self.total_steps,
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def _state(self) -> dict:
        return {
            **self._position_state(),
            "optimizer": self.optimizer.state_dict() if self.config.save_optimizer else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "weights": self.weights(),
        }

    def _sharded_tensors(self) -> dict:
        """This process's shards of the weights, the optimiser state (unless save_optimizer=False) and the EMA, as
        the distributed checkpoint stores and reads them."""
        tensors = sharding.state_tensors(self.net, self.optimizer if self.config.save_optimizer else None)
        if self.ema is not None:
            tensors["ema"] = {name: shadow for (name, _), shadow in zip(self.named_params, self.ema.shadow_params)}
        return tensors

    def save_training_state(self, model_files: list[str] | None = None) -> None:
        """training_state/ (``training_state.save_state``; sharded: ``save_sharded_state``, every rank).
        ``model_files``: the checkpoint's files just written (save_optimizer=False links its weights file instead
        of storing them again)."""
        if self.sharded:
            ema = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"} if self.ema else None
            state = {**self._position_state(), "ema": ema,
                     "optimizer": "shards" if self.config.save_optimizer else None}
            save_sharded_state(self.config.checkpoint_dir, state, self._sharded_tensors(),
                               seed=self.config.random_seed, is_main=self.is_main)
            return
        save_state(self.config.checkpoint_dir, self._state(), seed=self.config.random_seed,
                   link_from=None if self.config.save_optimizer else model_files or [])

    def _load_weights_and_optimizer(self, path: str) -> tuple[str, dict]:
        """The saved weights, optimiser state and EMA shadow put in place: the training state's folder and dict."""
        if self.sharded:
            folder, state = load_sharded_state(path, self._sharded_tensors())
            sharding.load_state_tensors(self.net, self.optimizer if state["optimizer"] else None, state["tensors"])
            return folder, state  # the EMA's shadow DTensors were read in place
        folder, state = load_state(path, [name for name, _ in self.named_params])
        with torch.no_grad():
            for name, param in self.named_params:
                param.copy_(state["weights"][name])
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        return folder, state

    def load_training_state(self, path: str) -> None:
        folder, state = self._load_weights_and_optimizer(path)
        if state["optimizer"] is None:
            logger.warning("%s was saved without the optimiser state (save_optimizer=False): the optimiser restarts "
                           "at step %d (its moments from zero); the weights, LR schedule, EMA and data position "
                           "continue", folder, int(state["step"]))
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            if state["ema"] is None:
                raise UserError(f"{folder}: saved without EMA; resume with use_ema=False or start afresh")
            self.ema.load_state_dict(state["ema"])
            # The state was read onto the CPU; the weights may be on a GPU (and the EMA stays in RAM with ema_device).
            self.ema.to(device="cpu" if self._ema_on_host() else self.params[0].device)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        global_micro = self.config.micro_batch_size * self.config.world_size
        position = int(state.get("sample_position", state["micro_position"] * global_micro))
        # The samples of the epoch consumed → the micro-batches here (another world size cuts other batches; saved
        # at the end of an epoch, the end of the epoch here too).
        self.micro_position, consumed = 0, 0
        for batch in self.global_batches(self.epoch):
            if consumed + len(batch) > position:
                break
            consumed += len(batch)
            self.micro_position += 1
        self.best_loss = state["best_loss"]
        if int(state["total_steps"]) != self.total_steps:
            logger.warning("the run now has %d optimiser steps in all (the saved run had %d): the LR schedule "
                           "continues from step %d", self.total_steps, state["total_steps"], self.step)
        set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d (epoch %d, micro-batch %d)", folder, self.step, self.epoch,
                    self.micro_position)

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, val_loss: float | None) -> None:
        out = self.config.checkpoint_dir
        try:
            improved = val_loss is None or self.best_loss is None or val_loss < self.best_loss
            if improved and val_loss is not None:
                self.best_loss = val_loss
            files = self._save_model_files(improved)
            self.save_training_state(files)
        except OSError as err:
            raise write_failure(err, f"the checkpoint at step {self.step}", out) from None
        logger.info("step %d: checkpoint saved to %s%s", self.step, out,
                    "" if improved else f" (last/ only; best validation loss stays {self.best_loss:.5f})")

    def _save_model_files(self, best: bool) -> list[str] | None:
        """The checkpoint's model files (``save_model_files``) of the weights it saves, the EMA's if any. Sharded:
        every rank takes part in gathering them one tensor at a time, into file-backed memory in a scratch folder of
        rank 0 (``sharding.gathered``), which writes them."""
        out, keep_all = self.config.checkpoint_dir, self.config.save_all_checkpoints
        if not self.sharded:
            return save_model_files(self.task, out, self.ema_weights(), self.step, best=best, keep_all=keep_all)
        if not self.is_main:
            sharding.gathered(self.ema_weights(), None)
            return None
        with tempfile.TemporaryDirectory(prefix=".gathered-", dir=out) as scratch:
            weights = sharding.gathered(self.ema_weights(), scratch)
            return save_model_files(self.task, out, weights, self.step, best=best, keep_all=keep_all)

    # ------------------------------------------------------------------------------------------- logging
    def _open_writer(self):
        from torch.utils.tensorboard import SummaryWriter

        # Resumed: the points the interrupted run logged after its checkpoint are dropped (the run logs them again);
        # the checkpoint's own step (its last training point, its validation loss) stays.
        self.writer = SummaryWriter(os.path.join(self.config.checkpoint_dir, "log"),
                                    purge_step=self.step + 1 if self.step else None)

    def _validate_and_save(self) -> float | None:
        from easynlp_ldm import distributed

        if self.sharded:  # every rank: the forward passes and the gathers are collectives
            return self._validate_and_save_main()
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
            samples = self._sample_images() if self.writer or self.sharded else []
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

    def _sample_images(self) -> list[tuple[str, Any]]:
        """The task's ``sample_images`` images, unless they would take more than ``sample_time_share`` of the wall
        time so far (``sampling_refusal``; one log line then says why)."""
        count = self.config.sample_images
        if count <= 0:
            return []
        start = _clock()
        refusal = sampling_refusal(self.sampling_seconds, self.seconds_per_image, count, start - self.started,
                                   self.config.sample_time_share)
        if self.sharded:  # every rank generates them (each forward pass gathers the blocks), as rank 0 decides
            from easynlp_ldm import distributed

            refusal = distributed.from_main(refusal)
        if refusal:
            logger.info("step %d: no sample images for TensorBoard: %s", self.step, refusal)
            return []
        samples = self.task.sample_images(count)
        took = _clock() - start
        self.sampling_seconds += took
        if samples:
            self.seconds_per_image = took / len(samples)
        return samples

    def _report_step(self, bar, loss_value: float, speed: float) -> bool:
        """Progress bar, TensorBoard and (every --logging_steps) a log line; True when the log line was written."""
        lr = self.scheduler.get_last_lr()[0]
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.1f}")
        if self.writer:
            self.writer.add_scalar("train/loss", loss_value, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            self.writer.add_scalar("train/grad_norm", self.last_grad_norm, self.step)
            self.writer.add_scalar("train/images_per_sec", speed, self.step)
        if self.step % self.config.logging_steps or not self.is_main:
            return False
        logger.info("step %d/%d epoch %d: loss %.5f lr %.3e grad_norm %.3f %.1f images/s", self.step,
                    self.total_steps, self.epoch, loss_value, lr, self.last_grad_norm, speed)
        return True

    # ---------------------------------------------------------------------------------------------- loop
    def global_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global micro-batches (--micro_batch_size × processes samples each), the same whatever the
        world size: the epoch's permutation cut in order; with groups (the task's aspect-ratio buckets), each group's
        samples in permutation order cut apart (a group's last batch may be short), then the batches shuffled by
        (seed, epoch)."""
        config = self.config
        order = epoch_order(self.task.num_examples(), config.random_seed, epoch)
        size = config.micro_batch_size * config.world_size
        if self.groups is None:
            return [order[i:i + size] for i in range(0, len(order), size)]
        members: dict[Any, list[int]] = {}
        for index in order:
            members.setdefault(self.groups[index], []).append(index)
        batches = [group[i:i + size] for group in members.values() for i in range(0, len(group), size)]
        generator = torch.Generator().manual_seed((config.random_seed * 1_000_003 + epoch) * 7 + 3)
        return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]

    def _micro_batches(self, epoch: int) -> list[MicroBatch]:
        """This rank's part of every global micro-batch of the epoch: the same global batches whatever the world
        size, each rank taking its slice.

        The epoch's last global micro-batch may be too short to give every rank a sample. A rank left without one
        still has to run a backward pass, since that micro-batch is the last of its optimiser step and DDP's
        all-reduce waits for every rank's gradients: it runs a stand-in, the global batch's first sample, with
        ``size`` 0, i.e. weighted by 0 (exact zero gradients; see ``_optimiser_step``). A real sample, rather than
        any cheaper pass, makes it the same computation graph as every other pass, so DDP sees the same parameters
        used."""
        batches = self.global_batches(epoch)
        rank, micro = self.config.rank, self.config.micro_batch_size
        return [MicroBatch(mine, len(mine), len(b)) if mine else MicroBatch(b[:1], 0, len(b))
                for b in batches for mine in [b[rank * micro:(rank + 1) * micro]]]

    def plan(self) -> Iterator[tuple[int, list[PlannedStep]]]:
        """What is left of the run, from the current (epoch, micro_position) — 0, 0 or where a resumed state left
        off — to ``total_steps``: per epoch, its remaining optimiser steps, each a group of up to
        --gradient_accumulation_steps micro-batches counted from that position."""
        accum = self.config.gradient_accumulation_steps
        step, epoch, start = self.step, self.epoch, self.micro_position
        while step < self.total_steps:
            micro_batches = self._micro_batches(epoch)
            steps = [PlannedStep(micro_batches[i:i + accum], min(i + accum, len(micro_batches)))
                     for i in range(start, len(micro_batches), accum)][:self.total_steps - step]
            yield epoch, steps
            step, epoch, start = step + len(steps), epoch + 1, 0

    def train(self) -> dict:
        config = self.config
        os.makedirs(config.checkpoint_dir, exist_ok=True)
        if config.resume_from_checkpoint:
            self.load_training_state(config.resume_from_checkpoint)
        self.started = _clock()
        if self.is_main:
            self._open_writer()
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (config.progress and self.is_main),
                   unit="step", dynamic_ncols=True)
        window_start, window_images = time.time(), 0
        for epoch, steps in self.plan():
            self.epoch = epoch
            data = iter(self.task.batches([m.indices for step in steps for m in step.micro_batches], epoch))
            for step in steps:
                loss_value, images = self._optimiser_step([(next(data), m) for m in step.micro_batches])
                self.micro_position = step.end
                window_images += images * config.world_size
                if self._report_step(bar, loss_value, window_images / max(time.time() - window_start, 1e-9)):
                    window_start, window_images = time.time(), 0
                if config.save_checkpoint_steps and self.step % config.save_checkpoint_steps == 0 \
                        and self.step < self.total_steps:
                    self._validate_and_save()
                    window_start, window_images = time.time(), 0  # images/s counts training time only
            if self.micro_position == self.micro_batches_per_epoch:
                self.epoch, self.micro_position = epoch + 1, 0
        bar.close()
        last_val = self._validate_and_save()
        if self.writer:
            self.writer.close()
        return {"step": self.step, "val_loss": last_val, "best_val_loss": self.best_loss}

    def _synchronising(self, last: bool):
        """DDP all-reduces (sharded: reduce-scatters) on the backward pass of a step's last micro-batch; the ones
        before accumulate locally."""
        if self.sharded:
            return sharding.gradient_sync(self.net.parts.values(), last)
        return contextlib.nullcontext() if last or self.model is self.net else self.model.no_sync()

    def _optimiser_step(self, micro_batches: list[tuple[Any, MicroBatch]]) -> tuple[float, int]:
        """One optimiser step over a group of micro-batches (each: the task's batch, what it is).

        Exactness: a single process weights each micro-batch's mean loss by 1/len(group). Here rank r weights its
        slice's mean loss by world_size × size_r / global_size / len(group), and DDP averages (÷ world_size) the
        gradients over ranks: Σ_r size_r × (mean gradient over slice r) / global_size is the mean gradient over the
        global micro-batch, so the result is the single-process gradient, a short last batch included; a stand-in
        (size 0) adds exact zeros. The gradients are all-reduced once per step, during the backward pass of its last
        micro-batch; the ones before accumulate locally (``no_sync``)."""
        total, images = 0.0, 0
        last = len(micro_batches) - 1
        for i, (batch, micro) in enumerate(micro_batches):
            weight = self.config.world_size * micro.size / micro.global_size / len(micro_batches)
            with self._synchronising(i == last):
                with torch.autocast(self.params[0].device.type, dtype=self.amp_dtype,
                                    enabled=self.amp_dtype is not None):
                    loss = self.model(batch)
                if not torch.isfinite(loss):  # a stand-in's sample is also another rank's: it stops there as well
                    raise UserError(f"loss is {loss.item()} at step {self.step + 1} (epoch {self.epoch}); stopped "
                                    f"without saving. Lower --learning_rate or check the data; the last good "
                                    f"checkpoint in {self.config.checkpoint_dir} is intact")
                scaled = loss * weight
                if self.scaler is not None:
                    self.scaler.scale(scaled).backward()
                else:
                    scaled.backward()
            if micro.size:
                total += loss.item() / len(micro_batches)
                images += micro.size
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm and self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)  # sharded: the whole norm
        elif self.sharded:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        else:
            norm = torch.norm(torch.stack([p.grad.norm() for p in self.params if p.grad is not None]))
        self.last_grad_norm = float(sharding.value(norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self._ema_step()
        self.step += 1
        return total, images
