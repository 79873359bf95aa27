"""Sharded training (``sharding=fsdp``): the trainer's modules split across the processes with PyTorch's FSDP2
(``torch.distributed.fsdp.fully_shard``), block by block.

* Each block the task names (``TrainTask.shard_units``: its model family's UNet down/mid/up blocks, transformer
  layers, text-encoder layers) is one unit, gathered whole for its forward and backward passes and sharded again
  after; each trained module is then sharded as a whole (its root: what is left outside the blocks). Every parameter
  becomes a ``DTensor`` sharded on its first dimension: each process holds 1/N of it, and of its gradient, optimiser
  moments and EMA (the optimiser and the EMA work on the local shards).
* Precision: no ``MixedPrecisionPolicy``; ``--use_amp`` autocasts the forward pass exactly as under DDP. The
  parameters, their reductions and the optimiser stay fp32, so N processes compute what one process computes (the
  equality the tests check) and what a DDP run computes.
* Gradients are reduce-scattered (averaged) once per optimiser step: the micro-batches before a step's last one
  accumulate locally (``gradient_sync``), as DDP's ``no_sync`` does.
* One process alone shards over a group of one (``distributed.process_group_of_one``): the same code path, the
  reference the multi-process runs are compared with.
* On a CPU, glibc's heap would keep the memory of the freed per-block buffers (``return_freed_buffers``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterable, Iterator

import torch

logger = logging.getLogger("easynlp.trainer")

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 65536
_mmap_threshold_set = False  # mallopt is called (and logged) once per process


def return_freed_buffers(device: torch.device) -> None:
    """On a CPU with glibc, every allocation above 64 KiB made its own mapping, returned to the kernel when freed.

    Why: glibc raises its mmap threshold to the size of each freed mapping (up to 32 MiB), after which a reduced
    model's per-block all-gather buffers (tens of MiB) come from the heap, which keeps what they free: measured
    (bench/train_distributed.py, docs/training.md), FSDP's peak RSS was 0.83x DDP's instead of 0.57x. A threshold
    the user set (``MALLOC_MMAP_THRESHOLD_`` or glibc's tunable) is left alone; elsewhere this does nothing."""
    global _mmap_threshold_set
    if _mmap_threshold_set or device.type != "cpu" or platform.libc_ver()[0] != "glibc":
        return
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    import ctypes

    if ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES):
        _mmap_threshold_set = True
        logger.info("sharding=fsdp on a CPU: allocations above %d bytes are mapped and returned to the system when "
                    "freed (glibc's mmap threshold; set MALLOC_MMAP_THRESHOLD_ to choose another)",
                    MMAP_THRESHOLD_BYTES)


def shard(modules: Iterable[torch.nn.Module], units: list[torch.nn.Module], device: torch.device,
          whole: set[torch.nn.Parameter] = frozenset()) -> None:
    """``units`` (blocks inside ``modules``), then each of ``modules``, sharded in place across the process group
    (the parameters become DTensors; the modules keep their names and forward). ``whole``: frozen parameters left
    out, held whole in every process as under DDP (a low-bit base's quantised weights: torchao's tensors cannot be
    split)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    ignored = set(whole) or None
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=ignored)
    for module in modules:
        fully_shard(module, mesh=mesh, ignored_params=ignored)


@contextlib.contextmanager
def gradient_sync(modules: Iterable[torch.nn.Module], enabled: bool) -> Iterator[None]:
    """A backward pass in the block reduce-scatters the gradients (``enabled``) or accumulates them locally, as
    DDP's ``no_sync``; synchronising again afterwards."""
    modules = list(modules)
    for module in modules:
        module.set_requires_gradient_sync(enabled)
    try:
        yield
    finally:
        for module in modules:
            module.set_requires_gradient_sync(True)


def value(tensor: torch.Tensor) -> torch.Tensor:
    """A reduced result (a gradient norm) as a plain tensor: a DTensor's full value, anything else as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def gathered(tensors: dict[str, torch.Tensor], scratch: str | None) -> dict[str, torch.Tensor]:
    """``tensors`` whole, gathered one at a time (every process must call this: each gather is a collective).

    ``scratch``: the folder of the process that writes the checkpoint (rank 0), None on the others, which drop each
    tensor at once and get an empty dict. Rank 0 copies each tensor, as soon as it is gathered, into a file there
    mapped back in (``torch.from_file``): the whole weights then live in the page cache, which the kernel writes back
    and drops under memory pressure, and the process's own memory never holds more than one whole tensor beyond its
    shards — whatever the size of the model — while the checkpoint writer reads them like any tensors. The files are
    the caller's to remove (the mappings stay valid after an unlink)."""
    whole = {}
    for index, (name, tensor) in enumerate(tensors.items()):
        full = value(tensor)
        if scratch is None:
            continue
        path = os.path.join(scratch, f"{index}.bin")
        with open(path, "wb") as handle:
            handle.truncate(full.numel() * full.element_size())
        mapped = torch.from_file(path, shared=True, size=full.numel(), dtype=full.dtype).view(full.shape)
        whole[name] = mapped.copy_(full)
    return whole


def _options():
    """The trained parameters only: a LoRA or ControlNet run's frozen base is the model it started from, not state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True)


def state_tensors(net: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, dict]:
    """The sharded trained weights (and the optimiser's state, unless None) of ``net`` as the distributed checkpoint
    stores them: parameter names as keys, DTensor shards as values (``torch.distributed.checkpoint.state_dict``)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(net, options=_options())}
    model, optim = get_state_dict(net, optimizer, options=_options())
    return {"model": model, "optimizer": optim}


def load_state_tensors(net: torch.nn.Module, optimizer: torch.optim.Optimizer | None, tensors: dict[str, dict]):
    """``state_tensors``' dict, read back by the distributed checkpoint, put into ``net`` and ``optimizer``."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    if optimizer is None:
        set_model_state_dict(net, tensors["model"], options=_options())
    else:
        set_state_dict(net, optimizer, model_state_dict=tensors["model"], optim_state_dict=tensors["optimizer"],
                       options=_options())
