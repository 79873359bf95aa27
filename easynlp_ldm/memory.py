"""The memory plan of a training run: its peak memory estimated before the first step, logged, and checked against
the memory available, so that a run that cannot fit stops with a one-line error naming the options that would make
it fit, instead of being killed by the kernel (exit 137, no message) minutes into its first step.

What a run holds (bytes; ``MemoryEstimate.parts``):

  weights      every component's parameters, trained and frozen, in their dtype
  gradients    one fp32 gradient per trained parameter
  optimizer    AdamW/Adam: two moments per trained parameter; SGD: one; Adafactor (``optimizer=adafactor``): a row
               and a column vector per matrix (for a 3×3 convolution that is 2/3 of its weights: transformers
               factors the last two dimensions), a full second moment for vectors, no first moment
  ema          one copy of the trained weights (``use_ema``), on the training device or in RAM (``ema_device=cpu``)
  amp_copies   ``--use_amp``: autocast keeps a half-precision copy of each trained weight during the step (the
               part alive at the peak: the backward pass frees them as it allocates the gradients)
  overhead     allocator slack and temporaries of a step, per trained parameter (measured)
  runtime      the interpreter, torch and the libraries, their thread pools (RAM only)
  save_copy    at each checkpoint of a GPU run the model's state dict is copied into RAM before it is written (on a CPU
               the state dict holds the live weights: no copy)

and the app's, from its model's ``ActivationPlan`` (a model family's: SD-1.x's in modelzoo/families/sd_memory.py):

  activations  what the step's passes keep for backward (the plan may name several such parts)
  encode       a pass over the data before the optimiser exists (an app's cache of encoded inputs), no gradients

Phases: ``load`` (the built modules, then the memory-mapped file's tensors in their place: the weights, in RAM),
``encode`` (before the optimiser exists: weights + encode, and the weights that leave after it:
``ModelFootprint.encode_only_bytes``, counted at load too), ``step`` (weights, optimiser, EMA, gradients,
activations, AMP copies) and ``save`` (weights, optimiser, EMA, the state-dict copy: gradients and activations are
gone by then). The estimate is the largest, per memory (the GPU's and RAM when training on a GPU; RAM on a CPU).

Several processes (``MemorySettings.processes``): the estimate is per process. Under DDP (``sharding=none``) each
holds all of the above, and

  buckets      DDP's gradient buckets: a flat fp32 copy of the trained parameters' gradients, all-reduced in
               buckets (torch's default, without ``gradient_as_bucket_view``), allocated once and kept

 Under FSDP2 (``sharding=fsdp``: ``fully_shard`` on each block of the trained module, then on
its root; ``ModelFootprint.shards``) every parameter of the wrapped components, trained and frozen, is split on its
first dimension into ``processes`` equal pieces (the last padded), and so are its gradient, optimiser state and EMA:
the step's and the save's weights, gradients, optimizer, ema and overhead are one process's shards. Beside them:

  gathered     the largest block unsharded while it computes (its all-gather's output and the parameters viewing it,
               in the forward and again in the backward pass, where its full gradients wait for their reduce-scatter:
               FSDP2 frees both after use), and the root's own parameters, unsharded from the forward through the
               backward pass (FSDP2 does not reshard the root after forward), with their full gradients; at a save,
               the block being consolidated. Nothing with one process: the unsharded parameters view the shards.

What is not sharded stays whole in every process: the frozen components outside the wrapped module, the activations
of the process's micro-batch, AMP's weight copies, the runtime, and the load and encode phases (the model is loaded
whole, then sharded by the trainer).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from easynlp_ldm import cgroups

logger = logging.getLogger("easynlp.memory")

GIB = 1024 ** 3

# Calibrated, with the latent_diffusion app's activation coefficients, on bench/train_memory.py's peak RSS of SD-1.5's
# architecture on CPU (1 031 M parameters, micro-batch 1): fp32 and bf16 autocast without checkpointing at 512², the
# memory recipe (checkpointing + autocast) at 256² and 512², AdamW + EMA fp32 at 256². Held out: AdamW + EMA fp32 at
# 512², micro-batch 2, PAI-Diffusion's architecture — 0.95-1.01 of the measured peak (table in bench/train_memory.py).
# On an H100 (SD-1.5's UNet alone, 512²) the same coefficients gave 1.07-1.11 × torch.cuda.max_memory_allocated.
RUNTIME_BYTES = int(0.55 * GIB)  # interpreter + torch/diffusers/transformers + oneDNN/OpenMP buffers, CPU runs
STEP_OVERHEAD_PER_PARAM = 1.1  # bytes per trained parameter on top of the counted parts during a step: allocator
#                               slack and temporaries (measured ~0.9 GiB for SD-1.5's UNet, whatever the resolution)
AMP_COPY_BYTES = 0.42  # bytes per trained parameter of autocast's half-precision weight copies alive at the peak
#                        (2 bytes each, but the backward pass frees them as it allocates the gradients)
FIT_MARGIN = 0.9  # the options proposed bring the estimate under this share of the memory available
FSDP_BLOCK_COPIES = 2.0  # the largest block's unsharded parameters and full gradients (pb + 4 bytes per parameter),
#                          this many times: the all-gather's and the reduce-scatter's flat buffers beside them
#                          (not fitted: with it the plan came within 0.99-1.12x of bench/train_distributed.py's rows)
MAX_SHARDING_DEVICES = 1024  # the most devices the "it fits with sharding=fsdp on K devices" advice considers


@dataclass(frozen=True)
class MemorySettings:
    """The run's settings that decide its memory."""

    micro_batch_size: int
    resolution: int  # pixels (square)
    gradient_checkpointing: bool
    use_amp: bool
    optimizer: str  # adamw (also Adam), sgd, adafactor
    use_ema: bool
    ema_device: str  # "": the training device; "cpu"
    save_optimizer: bool  # disk only: the optimiser state is saved from where it lives, without a copy
    device: str  # "cpu" or "cuda"
    cache_inputs: bool = True  # the app encodes its inputs once, before training (encode), not at every step
    processes: int = 1  # the run's processes (its world size): the estimate is per process
    sharding: str = "none"  # "none": each process holds the whole model (DDP); "fsdp": FSDP2 shards it

    @property
    def sharded(self) -> bool:
        return self.sharding == "fsdp" and self.processes > 1


class ActivationPlan(Protocol):
    """An app's count, in bytes, of what its model's passes keep alive for a run's settings."""

    labels: Mapping[str, str]  # part → its name in the one-line estimate (default: the part's own name)

    def step(self, settings: MemorySettings) -> dict[str, int]: ...  # part → bytes kept for backward at the step

    def encode(self, settings: MemorySettings) -> int: ...  # the pass before the optimiser exists (0: none)


@dataclass(frozen=True)
class ShardLayout:
    """How ``fully_shard`` wraps a run's trained module (``sharding=fsdp``): which of the footprint's components it
    shards, every parameter of them trained or frozen, the size of its largest block and of what belongs to no block
    (the root's own parameters)."""

    components: tuple[str, ...]
    largest_block: int  # parameters
    root: int  # parameters

    @classmethod
    def of(cls, components: tuple[str, ...], module, blocks) -> ShardLayout:
        """The layout of ``module`` (a torch module; with the other ``components`` it holds, e.g. a LoRA's adapters)
        when each of ``blocks`` (its submodules) is a ``fully_shard`` unit and ``module`` the root."""
        sizes = [sum(p.numel() for p in block.parameters()) for block in blocks]
        total = sum(p.numel() for p in module.parameters())
        return cls(components=components, largest_block=max(sizes, default=0), root=total - sum(sizes))


@dataclass(frozen=True)
class ModelFootprint:
    """What the estimate needs to know of the model: parameter shapes per component, trained or frozen, and the
    app's count of its activations."""

    trained: dict[str, list[tuple[int, ...]]]  # component → shapes of its trained parameters
    frozen: dict[str, int]  # component → number of frozen parameters
    param_bytes: int = 4
    activations: ActivationPlan | None = None  # None: no activations counted
    frozen_param_bytes: float | None = None  # bytes of a frozen weight when not param_bytes (2: bf16 base weights)
    # bytes of weights that leave memory after the encode phase (a text encoder once its embeddings are cached):
    # counted at load and encode, not in the step's and save's weights
    encode_only_bytes: int = 0
    shards: ShardLayout | None = None  # how sharding=fsdp shards it; None: not sharded (as DDP)
    # frozen parameters of the sharded components that sharding=fsdp leaves whole in every process (a quantised
    # base: torchao's tensors cannot be split)
    frozen_whole: int = 0
    # lower-precision frozen weights the app offers: (the option, as the user writes it; bytes per frozen weight;
    # its frozen_whole)
    precision_options: tuple[tuple[str, float, int], ...] = ()

    @property
    def trained_count(self) -> int:
        return sum(math.prod(s) for shapes in self.trained.values() for s in shapes)

    @property
    def frozen_count(self) -> int:
        return sum(self.frozen.values())

    @property
    def frozen_bytes(self) -> int:
        return int(self.frozen_count * (self.frozen_param_bytes or self.param_bytes))

    @property
    def weight_bytes(self) -> int:
        """Every component's weights, trained and frozen."""
        return self.trained_count * self.param_bytes + self.frozen_bytes


@dataclass
class MemoryEstimate:
    settings: MemorySettings
    footprint: ModelFootprint
    parts: dict[str, int]  # bytes of each part (see the module docstring)
    device: dict[str, int] = field(default_factory=dict)  # peak per phase on the training device (GPU runs)
    host: dict[str, int] = field(default_factory=dict)  # peak per phase in RAM

    @property
    def peak(self) -> int:
        """The peak of the memory that decides: the GPU's on a GPU run, RAM on a CPU run."""
        return max((self.device if self.settings.device != "cpu" else self.host).values())

    @property
    def host_peak(self) -> int:
        return max(self.host.values())

    def phase(self) -> str:
        phases = self.device if self.settings.device != "cpu" else self.host
        return max(phases, key=phases.get)

    def describe(self) -> str:
        """One line: the total and its main parts."""
        s, f = self.settings, self.footprint
        names = {"weights": "weights", "gradients": "gradients", "optimizer": f"optimizer ({s.optimizer})",
                 "ema": "EMA" + (" in RAM" if s.ema_device == "cpu" and s.device != "cpu" else ""),
                 "amp_copies": "AMP weight copies", "overhead": "step overhead", "runtime": "runtime",
                 "save_copy": "checkpoint copy", "encode_only_weights": "weights until the encode's end",
                 "gathered": "unsharded blocks", "buckets": "DDP gradient buckets",
                 **(f.activations.labels if f.activations else {})}
        parts = ", ".join(f"{names.get(k, k)} {v / GIB:.2f}" for k, v in self.parts.items() if v)
        where = "GPU" if s.device != "cpu" else "RAM"
        checkpointing = "gradient checkpointing, " if s.gradient_checkpointing else ""
        text = (f"{self.peak / GIB:.1f} GiB of {where} at the {self.phase()} (parts, GiB: {parts}; "
                f"{f.trained_count / 1e6:.0f} M parameters trained, {f.frozen_count / 1e6:.0f} M frozen"
                f"{f' at {f.frozen_param_bytes:g} bytes each' if f.frozen_param_bytes else ''}; micro-batch "
                f"{s.micro_batch_size} at {s.resolution}², {checkpointing}{'AMP' if s.use_amp else 'fp32'}"
                f"{f', per process of {s.processes} sharded with FSDP' if s.sharded and f.shards else ''})")
        if s.device != "cpu":
            text += f"; RAM {self.host_peak / GIB:.1f} GiB"
        return text


# ------------------------------------------------------------------------------------------------------ the parts
def optimizer_state_elements(shapes: list[tuple[int, ...]], optimizer: str) -> int:
    if optimizer in ("adamw", "adam"):
        return 2 * sum(math.prod(s) for s in shapes)
    if optimizer == "sgd":
        return sum(math.prod(s) for s in shapes)
    if optimizer == "adafactor":  # transformers' Adafactor, beta1=None: factored over the last two dimensions
        total = 0
        for shape in shapes:
            if len(shape) >= 2:
                total += math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
            else:
                total += math.prod(shape)
        return total
    raise ValueError(f"unknown optimizer {optimizer!r}")


def shard_shape(shape: tuple[int, ...], processes: int) -> tuple[int, ...]:
    """One process's piece of a parameter FSDP2 shards: its first dimension split evenly, the last piece padded."""
    return (-(-shape[0] // processes), *shape[1:]) if shape else shape


def _per_process_weights(f: ModelFootprint, s: MemorySettings) -> tuple[list[tuple[int, ...]], int, int]:
    """(the trained parameters' shapes, the frozen weights' bytes, the gathered part's bytes) one process holds at
    the step (see the module docstring)."""
    trained_shapes = [shape for shapes in f.trained.values() for shape in shapes]
    if not (s.sharded and f.shards):
        return trained_shapes, f.frozen_bytes, 0
    wrapped = f.shards.components
    trained_shapes = [shard_shape(shape, s.processes) if part in wrapped else shape
                      for part, shapes in f.trained.items() for shape in shapes]
    in_wrapped = sum(count for part, count in f.frozen.items() if part in wrapped)
    whole = min(f.frozen_whole, in_wrapped)
    frozen = f.frozen_count - in_wrapped + whole + -(-(in_wrapped - whole) // s.processes)
    per_parameter = f.param_bytes + 4  # the unsharded weight and its full gradient
    gathered = (FSDP_BLOCK_COPIES * f.shards.largest_block + f.shards.root) * per_parameter
    return trained_shapes, int(frozen * (f.frozen_param_bytes or f.param_bytes)), int(gathered)


def estimate(footprint: ModelFootprint, settings: MemorySettings) -> MemoryEstimate:
    s, f = settings, footprint
    pb = f.param_bytes
    trained_shapes, frozen_bytes, gathered = _per_process_weights(f, s)
    trained = sum(math.prod(shape) for shape in trained_shapes)  # this process's: its shards under FSDP
    weights = trained * pb + frozen_bytes
    optimizer = s.optimizer if s.optimizer != "adam" else "adamw"
    activations = f.activations.step(s) if f.activations else {}
    parts = {
        "weights": weights,
        "gradients": trained * 4,
        "optimizer": optimizer_state_elements(trained_shapes, optimizer) * 4,
        "ema": trained * pb if s.use_ema else 0,
        # autocast's copies are made of the unsharded weights of every block in turn and kept for backward
        "amp_copies": int(f.trained_count * AMP_COPY_BYTES) if s.use_amp else 0,
        **activations,
        "gathered": gathered,
        "buckets": trained * 4 if s.processes > 1 and not (s.sharded and f.shards) else 0,
        "overhead": int(trained * STEP_OVERHEAD_PER_PARAM),
        "runtime": RUNTIME_BYTES,
        # The state dict holds the live weights on a CPU (modelzoo/ldm.py); from a GPU it is a copy in RAM.
        "save_copy": weights if s.device != "cpu" else 0,
        "encode": f.activations.encode(s) if f.activations else 0,
        "encode_only_weights": f.encode_only_bytes,
    }
    p = parts
    ema_with_weights = p["ema"] if (s.ema_device != "cpu" or s.device == "cpu") else 0
    # consolidating a sharded checkpoint gathers one tensor at a time (counted as the largest block: an upper bound)
    save_gathered = f.shards.largest_block * pb if gathered and f.shards else 0
    on_device = {
        # before the trainer shards it, every process holds the whole model
        "encode": f.weight_bytes + p["encode_only_weights"] + p["encode"],
        "step": (p["weights"] + p["gradients"] + p["optimizer"] + ema_with_weights + p["amp_copies"]
                 + sum(activations.values()) + p["gathered"] + p["buckets"] + p["overhead"]),
        "save": p["weights"] + p["optimizer"] + ema_with_weights + save_gathered + p["buckets"],
    }
    result = MemoryEstimate(settings, footprint, parts)
    # Loading: the freshly built modules, whose weights are then replaced by the memory-mapped file's tensors
    # (modelzoo/ldm.py, assign=True): one copy of the weights, in RAM, before anything else.
    load = f.weight_bytes + p["encode_only_weights"] + p["runtime"]
    if s.device == "cpu":
        result.host = {k: v + p["runtime"] + (p["save_copy"] if k == "save" else 0) for k, v in on_device.items()}
        result.host["load"] = load
    else:
        result.device = on_device
        host_ema = p["ema"] - ema_with_weights
        result.host = {"load": load, "encode": p["runtime"], "step": p["runtime"] + host_ema,
                       "save": p["runtime"] + host_ema + p["save_copy"]}
    return result


# --------------------------------------------------------------------------------------------- what is available
def available_memory(device: str) -> tuple[int, str]:
    """(bytes, where from) the run may use: on a GPU its free memory plus what this process's torch already
    holds; on a CPU the machine's RAM (``os.sysconf``) or the cgroup's limit when lower, shared by the training
    processes of this machine (``LOCAL_WORLD_SIZE``, set by torchrun)."""
    if device != "cpu":
        import torch

        free, _total = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved(), f"free GPU memory of {torch.cuda.get_device_name()}"
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        source = "RAM"
    except (ValueError, OSError):
        ram, source = 1 << 62, "RAM (unknown)"
    limit = cgroups.memory_limit()
    if limit and limit[0] < ram:
        ram, source = limit
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if processes > 1:
        return ram // processes, f"{source}, shared by {processes} processes"
    return ram, source


def process_figures(pid: int | str = "self") -> dict[str, int]:
    """What a running process holds now: ``rss_bytes`` (resident memory) and ``threads``, from
    ``/proc/<pid>/status`` (serve's /metrics, bench/serve_soak.py); empty where there is no /proc."""
    try:
        lines = open(f"/proc/{pid}/status", encoding="ascii", errors="replace").read().splitlines()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return {"rss_bytes": int(fields["VmRSS"].split()[0]) * 1024, "threads": int(fields["Threads"])}


# ------------------------------------------------------------------------------------------------ what would fit
def _ema_option(settings: MemorySettings) -> tuple[str, dict] | None:
    if not settings.use_ema:
        return None
    if settings.device != "cpu" and settings.ema_device != "cpu":
        return "ema_device=cpu (or use_ema=False)", {"ema_device": "cpu"}
    return "use_ema=False", {"use_ema": False}


def fitting_options(footprint: ModelFootprint, settings: MemorySettings, limit: int,
                    effective_batch: int | None = None) -> tuple[list[str], MemoryEstimate | None]:
    """The options, cheapest first, that bring the estimate within ``limit``, each taken only if it lowers it:
    a smaller micro-batch (with gradient accumulation keeping ``effective_batch``), gradient checkpointing, AMP,
    Adafactor, the EMA in RAM (GPU) or off. Returns them and the estimate with them; ([...], None) when even all
    of them do not fit."""
    chosen: list[str] = []
    current = settings
    effective = effective_batch or settings.micro_batch_size

    def smallest_batch_that_fits(base: MemorySettings) -> MemorySettings | None:
        size = base.micro_batch_size
        while size >= 1:
            candidate = dataclasses.replace(base, micro_batch_size=size)
            if estimate(footprint, candidate).peak <= limit and (
                    base.device == "cpu" or estimate(footprint, candidate).host_peak <= limit_host):
                return candidate
            if size == 1:
                return None
            size = max(1, size // 2)
        return None

    limit_host = _host_limit(settings)
    steps = [("gradient_checkpointing=True", {"gradient_checkpointing": True}),
             ("--use_amp", {"use_amp": True}),
             ("optimizer=adafactor", {"optimizer": "adafactor"})]
    ema = _ema_option(settings)
    if ema:
        steps.append(ema)
    for text, change in [(None, None), *steps]:
        if text is not None:
            candidate = dataclasses.replace(current, **change)
            if candidate == current or estimate(footprint, candidate).peak >= estimate(footprint, current).peak:
                continue
            current = candidate
            chosen.append(text)
        fits = smallest_batch_that_fits(current)
        if fits is not None:
            if fits.micro_batch_size < settings.micro_batch_size:
                accumulation = max(1, math.ceil(effective / fits.micro_batch_size))
                chosen.insert(0, f"--micro_batch_size={fits.micro_batch_size}"
                              + (f" --gradient_accumulation_steps={accumulation}" if accumulation > 1 else ""))
            return chosen, estimate(footprint, fits)
    return chosen, None


def devices_to_fit(footprint: ModelFootprint, settings: MemorySettings, limit: int) -> MemoryEstimate | None:
    """The estimate with ``sharding=fsdp`` over the fewest processes, more than the run's, each within ``limit``
    (one device's memory); None when the footprint cannot be sharded or no number of devices up to
    MAX_SHARDING_DEVICES fits (what is not sharded is too large)."""
    if footprint.shards is None:
        return None
    start = settings.processes + 1 if settings.sharding == "fsdp" else max(2, settings.processes)
    most = dataclasses.replace(settings, sharding="fsdp", processes=MAX_SHARDING_DEVICES)
    if start > MAX_SHARDING_DEVICES or estimate(footprint, most).peak > limit:
        return None
    low, high = start, MAX_SHARDING_DEVICES  # the per-process estimate falls as processes grow: bisect
    while low < high:
        middle = (low + high) // 2
        if estimate(footprint, dataclasses.replace(most, processes=middle)).peak <= limit:
            high = middle
        else:
            low = middle + 1
    return estimate(footprint, dataclasses.replace(most, processes=low))


def precision_to_fit(footprint: ModelFootprint, settings: MemorySettings,
                     limit: int) -> tuple[str, MemoryEstimate] | None:
    """The app's first lower-precision option for the frozen weights (``ModelFootprint.precision_options``, highest
    precision first) whose estimate is within ``limit``, and that estimate."""
    current = footprint.frozen_param_bytes or footprint.param_bytes
    for option, frozen_bytes, whole in footprint.precision_options:
        if frozen_bytes >= current or not footprint.frozen_count:
            continue
        result = estimate(dataclasses.replace(footprint, frozen_param_bytes=frozen_bytes, frozen_whole=whole),
                          settings)
        if result.peak <= limit:
            return option, result
    return None


def scale_out_advice(footprint: ModelFootprint, settings: MemorySettings, limit: int) -> str:
    """What else would make the run fit a device of ``limit`` bytes: sharding over more of them, lower-precision
    frozen weights ("" when neither does)."""
    where = "GPUs" if settings.device != "cpu" else "machines (one process each)"
    advice = []
    sharded = devices_to_fit(footprint, settings, limit)
    if sharded is not None:
        advice.append(f"sharding=fsdp over {sharded.settings.processes} {where} (estimated "
                      f"{sharded.peak / GIB:.1f} GiB per process)")
    precision = precision_to_fit(footprint, settings, limit)
    if precision is not None:
        advice.append(f"{precision[0]} (estimated {precision[1].peak / GIB:.1f} GiB)")
    return f"; as it is, it would fit with {' or with '.join(advice)}" if advice else ""


def _host_limit(settings: MemorySettings) -> int:
    return available_memory("cpu")[0] if settings.device != "cpu" else 1 << 62


def check(footprint: ModelFootprint, settings: MemorySettings, *, limit_gb: float = 0.0, enforce: bool = True,
          effective_batch: int | None = None) -> MemoryEstimate:
    """Estimate, log one line, and raise a one-line ``UserError`` naming what would fit when the estimate exceeds
    the memory available (``limit_gb`` > 0 lowers it; ``enforce=False`` logs a warning instead)."""
    from easynlp_ldm.errors import UserError

    result = estimate(footprint, settings)
    available, source = available_memory(settings.device)
    if limit_gb > 0 and limit_gb * GIB < available:
        available, source = int(limit_gb * GIB), f"memory_limit_gb={limit_gb:g}"
    logger.info("memory plan: estimated peak %s; %.1f GiB available (%s)", result.describe(), available / GIB,
                source)
    over_device = result.peak > available
    over_host = settings.device != "cpu" and result.host_peak > _host_limit(settings)
    if not (over_device or over_host):
        return result
    options, fitted = fitting_options(footprint, settings, int(FIT_MARGIN * available), effective_batch)
    head = f"the estimated peak memory of this run, {result.describe()}, exceeds the {available / GIB:.1f} GiB " \
           f"available ({source})"
    if fitted is not None:
        advice = f"it fits with {', '.join(options)} (estimated {fitted.peak / GIB:.1f} GiB, with a 10 % margin)"
    else:
        floor = estimate(footprint, dataclasses.replace(settings, micro_batch_size=1, gradient_checkpointing=True,
                                                        use_amp=True, optimizer="adafactor", use_ema=False))
        advice = (f"it does not fit even with micro-batch 1, gradient_checkpointing=True, --use_amp, "
                  f"optimizer=adafactor, use_ema=False (estimated {floor.peak / GIB:.1f} GiB): train fewer parameters "
                  f"or use a machine with more memory")
    advice += scale_out_advice(footprint, settings, int(FIT_MARGIN * available))
    message = f"{head}; {advice}; memory_check=False tries anyway"
    if enforce:
        raise UserError(message)
    logger.warning("memory_check=False: %s", message)
    return result
