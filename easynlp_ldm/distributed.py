"""Processes: launching workers with torchrun's own machinery, joining a process group, rank-aware helpers.

* ``--worker_gpu=N`` (N > 1) and/or ``--worker_count=M`` (M > 1): this command re-launches itself through
  ``torch.distributed.run`` (torchrun) with N processes per node on M nodes; ``--master_addr``/``--master_port``/
  ``--node_rank`` default to ``MASTER_ADDR``/``MASTER_PORT``/``NODE_RANK`` from the environment, as PAI-DLC,
  Kubernetes PyTorchJob and Slurm set them.
* Started by torchrun or a cluster launcher already (``RANK`` and ``WORLD_SIZE`` set): it joins that group instead.
* Backend: ``--distributed_backend`` (EasyNLP's default nccl), gloo when there is no CUDA; collectives time out
  after ``--collective_timeout`` seconds.
* Training: the trainer's modules run inside ``DistributedDataParallel`` (``data_parallel``), or sharded with FSDP2
  (``sharding.py``; one process alone then joins a group of one, ``process_group_of_one``).
* A worker that dies ends the whole job: torchrun's agent stops the others, and the error names the rank. A
  launcher that dies (even by SIGKILL) takes the workers it launched with it (``die_with_launcher``).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
import warnings
from dataclasses import dataclass

import torch

from easynlp_ldm.errors import UserError

logger = logging.getLogger("easynlp.distributed")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = ""  # "": not chosen yet (model_device() picks)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


_CONTEXT = DistContext()


def context() -> DistContext:
    return _CONTEXT


def model_device() -> torch.device:
    """Where this process runs its model: its GPU (``cuda:LOCAL_RANK``) when it can see one, else the CPU.
    ``CUDA_VISIBLE_DEVICES=""`` keeps a GPU machine's run on the CPU."""
    global _CONTEXT
    if not _CONTEXT.device:
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(_CONTEXT.local_rank)
        _CONTEXT = dataclasses.replace(_CONTEXT, device=f"cuda:{_CONTEXT.local_rank}" if cuda else "cpu")
    return torch.device(_CONTEXT.device)


def launched_by_launcher() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def wants_launch(flags) -> bool:
    return not launched_by_launcher() and (flags.worker_gpu > 1 or flags.worker_count > 1)


def launch(flags, argv: list[str]) -> int:
    """Run this same command in N×M workers with torchrun's machinery; returns the exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    nproc = max(1, flags.worker_gpu)
    nnodes = max(1, flags.worker_count)
    addr = flags.master_addr or os.environ.get("MASTER_ADDR") or "127.0.0.1"
    port = flags.master_port if "master_port" in flags.given else int(os.environ.get("MASTER_PORT",
                                                                                      flags.master_port))
    node_rank = flags.node_rank if flags.node_rank is not None else int(os.environ.get("NODE_RANK", "0"))
    if nnodes > 1 and addr in ("127.0.0.1", "localhost") and node_rank == 0:
        logger.warning("--worker_count=%d with master address %s: other nodes must reach this node's address; "
                       "set MASTER_ADDR or --master_addr", nnodes, addr)
    launcher_args = get_args_parser().parse_args([
        f"--nproc_per_node={nproc}", f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={addr}",
        f"--master_port={port}", "--max_restarts=0", "--monitor_interval=0.5", "-m", "easynlp_ldm.cli", *argv])
    logger.info("launching %d worker(s) per node on %d node(s) (node rank %d, master %s:%d)", nproc, nnodes,
                node_rank, addr, port)
    os.environ[LAUNCHER_PID] = str(os.getpid())  # the workers die with this process (die_with_launcher)
    try:
        run(launcher_args)
    except ChildFailedError as err:
        # The root cause: the agent stops the surviving workers with SIGTERM, so a worker that failed otherwise
        # (an exit code, SIGKILL, a segfault) is the one to name; among equals, the earliest.
        import signal as _signal

        def cause(item):
            rank, failure = item
            stopped = failure.exitcode == -_signal.SIGTERM
            return (stopped, failure.timestamp, rank)

        rank, failure = min(err.failures.items(), key=cause)
        how = (f"signal {failure.signal_name()}" if failure.exitcode is not None and failure.exitcode < 0
               else f"exit code {failure.exitcode}")
        reason = f" ({failure.message})" if isinstance(failure.message, str) and failure.message else ""
        raise UserError(f"worker rank {rank} failed with {how}{reason}; the other workers were stopped") from None
    return 0


LAUNCHER_PID = "EASYNLP_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1  # prctl's option (linux/prctl.h)


def die_with_launcher() -> None:
    """A worker that this command launched (``launch``) is killed when the launcher dies, whatever kills it.

    torchrun starts each worker in a session of its own, so a launcher killed outright (SIGKILL, the OOM killer)
    would leave its workers running on, unseen, holding their memory and writing to the checkpoint folder while the
    user reruns the command. Linux's parent-death signal kills them with it instead (the training state on disk is
    the last one swapped in whole); a worker whose launcher is already gone exits at once. Nothing elsewhere than on
    Linux, nor under a launcher of the user's own (torchrun, a cluster's)."""
    launcher = os.environ.get(LAUNCHER_PID)
    if not launcher or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(launcher):  # it died before the signal was set
        os._exit(1)


def init_from_env(backend: str | None, timeout_s: float, explicit: bool = False) -> DistContext:
    """Join the process group described by the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    ``backend``: ``--distributed_backend`` (EasyNLP's default ``nccl``). A process without CUDA cannot use NCCL, so
    it uses gloo instead, with a note (a warning when the user named nccl, ``explicit``)."""
    global _CONTEXT
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _CONTEXT = DistContext(rank, world, local_rank)
    if world <= 1:
        return _CONTEXT
    cuda = model_device().type == "cuda"
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        if rank == 0:
            (logger.warning if explicit else logger.info)(
                "--distributed_backend=nccl needs CUDA; this run is on the CPU, so it uses gloo")
        backend = "gloo"
    torch.distributed.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)  # one voice: rank 0 logs progress
    return _CONTEXT


def shutdown() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if _CONTEXT.enabled:
        torch.distributed.barrier()


def process_group_of_one(device: torch.device) -> None:
    """A process group of this process alone (gloo on the CPU, nccl on its GPU, over an in-memory store), for what
    needs one even in a single process (sharding=fsdp); nothing when a group exists already."""
    if torch.distributed.is_initialized():
        return
    torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                         store=torch.distributed.HashStore(), rank=0, world_size=1)


def from_main(value):
    """Rank 0's ``value`` on every rank (a small picklable object: a decision, a path), where a decision taken on
    rank 0 alone must be followed by all; ``value`` as it is in a single process."""
    if not _CONTEXT.enabled:
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` inside ``DistributedDataParallel`` over this process group: gradients are AVERAGED over ranks by
    bucketed all-reduces that start while the backward pass is still running.

    * gloo on CPU (``device_ids=None``), the process's own GPU on CUDA.
    * No buffer broadcast at every forward (``broadcast_buffers=False``, called ``forward_sync_buffers`` from torch
      2.13 on): every rank starts from the same weights and buffers (DDP broadcasts rank 0's once, here) and
      nothing trained keeps running statistics.
    * ``find_unused_parameters``: a trainable part may hold parameters the loss never reaches (BERT's pooler when
      the text encoder trains); DDP then marks them ready instead of waiting for them forever. Its graph walk costs
      nothing measurable next to a training step; where nothing is unused, torch says so once per rank (a C++
      notice, "find_unused_parameters=True was specified … but did not find any unused parameters").
    * oneDNN gives 1×1 convolution weights gradients with channels-last strides, which differ from the
      parameter's in size-1 dimensions only: DDP copies them into its buckets correctly, so its "Grad strides do
      not match bucket view strides" warning is silenced."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    no_buffer_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                      inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
    device = next(module.parameters()).device
    return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True, **{no_buffer_sync: False})
