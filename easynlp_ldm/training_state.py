"""A training run's checkpoint folder: the model's files (written by the task) and the training state resume needs.

Checkpoint folder (``--checkpoint_dir``):
  config.json, pytorch_model.bin, vocab.txt, … — the best checkpoint by validation loss (the last one when there is
                                                 no validation table); what predict and serve load by default
  last/                                        — the most recent checkpoint, same files
  checkpoint-STEP/                             — every checkpoint, with --save_all_checkpoints
  training_state/                              — what resume needs; swapped in atomically. With
                                                 save_optimizer=False no optimiser state, and the weights the
                                                 checkpoint saved (EMA or raw) are a hard link to its weights file
                                                 (model_weights.bin) instead of a second copy
  log/                                         — TensorBoard event files (losses, learning rate; at each
                                                 checkpoint the config's sample_images images, unless they would
                                                 take more than its sample_time_share of the wall time)

The training state (``state.pt``, read with ``weights_only=True``) is the trainer's dict — raw weights, optimiser, LR
schedule, EMA, step, epoch, position in the epoch, RNG states (``rng_state``) — plus ``linked``: which weights, if
any, are the hard-linked ``model_weights.bin``. ``trainer_meta.json`` repeats the position for people and tools.

Sharded training (sharding=fsdp): ``state.pt`` (written by rank 0) holds the same dict without its tensors, marked
``sharded``; the weights, the optimiser's state and the EMA are a distributed checkpoint in ``shards/``
(``torch.distributed.checkpoint``: every process writes its own shards, no pickles), which any number of processes
reads back (it reshards). The folder is swapped in as one unit all the same.
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any

import numpy as np
import torch

from easynlp_ldm.errors import UserError
from easynlp_ldm.files import (
    atomic_link,
    atomic_replace_folder,
    atomic_torch_save,
    atomic_write_text,
    is_disk_full,
    previous_folder,
)

logger = logging.getLogger("easynlp.trainer")

STATE_DIR = "training_state"
STATE_FILE = "state.pt"
LINKED_WEIGHTS = "model_weights.bin"  # save_optimizer=False: a hard link to the saved model's weights file
META_FILE = "trainer_meta.json"
SHARDS_DIR = "shards"  # sharding=fsdp: the distributed checkpoint of the weights, optimiser and EMA


# ------------------------------------------------------------------------------------------ model files
def _link_files(files: list[str] | None, folder: str, root: str) -> bool:
    """Hard-link ``files`` (written under ``root``) into ``folder`` at the same paths relative to it (a model of
    subfolders, as diffusers writes one, keeps them), each replacing its namesake atomically. False (and nothing half
    done that matters: the caller writes the folder in full) where the file system has no hard links."""
    if not files:
        return False
    os.makedirs(folder, exist_ok=True)
    try:
        for path in files:
            target = os.path.join(folder, os.path.relpath(path, root))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            atomic_link(path, target)
    except OSError as err:
        logger.debug("hard links into %s failed (%s); writing it in full", folder, err)
        return False
    return True


def save_model_files(task: Any, out: str, weights: dict[str, torch.Tensor], step: int, *, best: bool,
                     keep_all: bool) -> list[str] | None:
    """The checkpoint's model files, written by ``task.save_model``: in ``last/``, and in ``out`` itself when they are
    the ``best`` (``last/`` then gets hard links to the same files), in ``checkpoint-STEP/`` too with ``keep_all``.
    Returns the files of the last save that listed them (what ``save_state`` may link)."""
    last = os.path.join(out, "last")
    if best:  # the best is also the last: written once, last/ gets hard links to the same files
        files = task.save_model(out, weights)
        if not _link_files(files, last, out):
            files = task.save_model(last, weights)
    else:
        files = task.save_model(last, weights)
    if keep_all:
        task.save_model(os.path.join(out, f"checkpoint-{step}"), weights)
    return files


def write_failure(err: OSError, what: str, keep: str) -> UserError:
    """The one-line error for a checkpoint that could not be written (``keep``: the folder whose last complete
    checkpoint is intact)."""
    if is_disk_full(err):
        return UserError(f"disk full while saving {what}; the last complete checkpoint in {keep} is intact — free "
                         f"space and rerun with --resume_from_checkpoint={keep}")
    return UserError(f"cannot save {what} ({err.strerror or err}); the last complete checkpoint in {keep} is intact")


# --------------------------------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    """This process's python/numpy/torch RNG states, in types ``weights_only=True`` loads (lists, tensors)."""
    py, np_state = random.getstate(), np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], torch.as_tensor(np_state[1]), np_state[2], np_state[3], np_state[4]],
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """The RNG states ``rng_state`` saved, back in this process."""
    py, np_state = state["python"], state["numpy"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np.random.set_state((np_state[0], np_state[1].numpy(), np_state[2], np_state[3], np_state[4]))
    torch.set_rng_state(state["torch"])


# ------------------------------------------------------------------------------------------ the state
def find_training_state(path: str) -> str:
    """``--resume_from_checkpoint`` may name the checkpoint folder or its training_state/ folder."""
    for candidate in (path, os.path.join(path, STATE_DIR), previous_folder(os.path.join(path, STATE_DIR))):
        if os.path.isfile(os.path.join(candidate, STATE_FILE)):
            return candidate
    raise UserError(f"--resume_from_checkpoint={path}: no training state there (expected {STATE_DIR}/{STATE_FILE}; "
                    f"it is written at every --save_checkpoint_steps)")


def _link_saved_weights(model_files: list[str] | None, weights: dict[str, torch.Tensor], staging: str) -> bool:
    """The weights the checkpoint just saved for inference are already on disk in the model's weights file. When
    that file holds them under the trainer's names, with ``weights``' shapes and dtypes (this toolkit's format),
    ``staging`` gets a hard link to it instead of a second copy — a snapshot: the next checkpoint replaces the model's
    file by a new one and the link keeps this one. False when they have to be stored (another format, no hard
    links)."""
    for path in model_files or []:
        if not path.endswith((".bin", ".pt", ".pth")):
            continue
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # not a torch file of plain tensors: not the weights
            continue
        if not isinstance(saved, dict) or not all(
                isinstance(saved.get(name), torch.Tensor) and saved[name].shape == p.shape
                and saved[name].dtype == p.dtype for name, p in weights.items()):
            continue
        try:
            os.link(path, os.path.join(staging, LINKED_WEIGHTS))
        except OSError as err:
            logger.debug("no hard link to %s (%s): the training state stores the weights", path, err)
            return False
        return True
    return False


def _write_state_files(staging: str, state: dict, seed: int) -> None:
    atomic_torch_save(state, os.path.join(staging, STATE_FILE))
    atomic_write_text(os.path.join(staging, META_FILE), json.dumps({
        "step": state["step"], "epoch": state["epoch"], "micro_position": state["micro_position"],
        "total_steps": state["total_steps"], "seed": seed}))


def save_state(checkpoint_dir: str, state: dict, *, seed: int, link_from: list[str] | None = None) -> None:
    """``state`` (the trainer's dict) as ``checkpoint_dir/training_state/``, one unit: both files written (each
    fsynced) and the folder swapped in whole (``atomic_replace_folder``; find_training_state also accepts the
    ``.old`` folder a kill between its two renames leaves). ``link_from``: the checkpoint's model files just
    written, when the weights they hold (the EMA's when ``state`` has an EMA, else the raw ones) may be a hard link
    instead of a copy (save_optimizer=False); None: everything stored."""
    with atomic_replace_folder(os.path.join(checkpoint_dir, STATE_DIR)) as staging:
        linked = None
        if link_from is not None and _link_saved_weights(link_from, state["weights"], staging):
            linked = "ema" if state["ema"] is not None else "weights"
        if linked == "weights":
            state = {**state, "weights": None}
        elif linked == "ema":
            state = {**state, "ema": {**state["ema"], "shadow_params": None}}
        _write_state_files(staging, {**state, "linked": linked}, seed)


def save_sharded_state(checkpoint_dir: str, state: dict, tensors: dict, *, seed: int, is_main: bool) -> None:
    """Every process: ``state`` (the trainer's dict without tensors; rank 0's is written) and ``tensors`` (this
    process's shards of the weights, optimiser and EMA) as ``checkpoint_dir/training_state/``, swapped in whole by
    rank 0 once every process has written its shards."""
    from easynlp_ldm import distributed

    if not is_main:
        _save_shards(None, tensors)
        distributed.barrier()  # rank 0 swaps the folder in
        return
    with atomic_replace_folder(os.path.join(checkpoint_dir, STATE_DIR)) as staging:
        _save_shards(staging, tensors)
        _write_state_files(staging, {**state, "sharded": True}, seed)
    distributed.barrier()


def _save_shards(staging: str | None, tensors: dict) -> None:
    """The distributed checkpoint into rank 0's ``staging`` folder (the others learn where from it). When
    ``dcp.save`` returns on rank 0 every process has written its files and rank 0 its metadata."""
    import torch.distributed.checkpoint as dcp

    from easynlp_ldm import distributed

    staging = distributed.from_main(staging)
    dcp.save(tensors, checkpoint_id=os.path.join(staging, SHARDS_DIR))


def load_state(path: str, names: list[str]) -> tuple[str, dict]:
    """The training state ``--resume_from_checkpoint=path`` names, for trainable parameters ``names`` (in the
    trainer's order): its folder and the state saved, hard-linked weights read back in place. ``UserError`` when it
    cannot be read or was saved for other trainable parts."""
    folder = find_training_state(path)
    try:
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{folder}/{STATE_FILE}: cannot read the training state ({type(err).__name__})") \
            from None
    linked = state.get("linked")
    if linked:  # save_optimizer=False: the weights the checkpoint saved for inference, hard-linked
        try:
            saved = torch.load(os.path.join(folder, LINKED_WEIGHTS), map_location="cpu", weights_only=True,
                               mmap=True)
            tensors = {name: saved[name] for name in names}
        except Exception as err:
            raise UserError(f"{folder}/{LINKED_WEIGHTS}: cannot read the checkpoint's weights "
                            f"({type(err).__name__})") from None
        if linked == "weights":
            state["weights"] = tensors
        else:
            state["ema"]["shadow_params"] = [tensors[name].clone() for name in names]
    if state.get("sharded"):
        raise UserError(f"{folder}: saved by a sharded run (sharding=fsdp); resume it with sharding=fsdp")
    if set(state["weights"]) != set(names):
        raise UserError(f"{folder}: the training state was saved for other trainable parts (e.g. a different "
                        f"train_text_encoder setting); resume with the same settings")
    return folder, state


def load_sharded_state(path: str, tensors: dict) -> tuple[str, dict]:
    """The training state of a sharded run that ``--resume_from_checkpoint=path`` names: its folder and ``state.pt``'s
    dict (``optimizer``: None when the shards hold no optimiser state), with ``tensors``: the shards read into
    ``tensors`` in place (``save_sharded_state``'s dict of this run's DTensors, any number
    of processes). ``UserError`` when it cannot be read, was not saved by a sharded run, or for other trainable
    parts."""
    import torch.distributed.checkpoint as dcp

    folder = find_training_state(path)
    try:
        state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"{folder}/{STATE_FILE}: cannot read the training state ({type(err).__name__})") from None
    if not state.get("sharded"):
        raise UserError(f"{folder}: saved by an unsharded run; resume it with sharding=none")
    if state["optimizer"] is None:  # save_optimizer=False: no optimiser state among the shards
        tensors = {key: value for key, value in tensors.items() if key != "optimizer"}
    try:
        dcp.load(tensors, checkpoint_id=os.path.join(folder, SHARDS_DIR))
    except Exception as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{folder}/{SHARDS_DIR}: cannot read the sharded training state (saved for other trainable "
                        f"parts? {message[:200]})") from None
    return folder, {**state, "tensors": tensors}
