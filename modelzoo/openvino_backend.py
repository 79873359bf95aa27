"""The OpenVINO runtime as an inference backend for CPU: the UNet and the VAE decoder of a loaded model run as
OpenVINO compiled models, everything else (text encoder, scheduler, initial noise, latents) stays PyTorch in fp32,
so a seed means the same image as with ``optimize=none``.

How: ``openvino.convert_model`` traces our own fp32 module once (inputs dynamic) and the IR is kept on disk under
``openvino_cache_dir()/<key>/`` — the key hashes the weights, the module's class and config, and the library
versions, so a fine-tuned or LoRA-merged model gets its own IR and a changed model never meets a stale one. Each
input shape seen (batch × latent size × text length) gets the IR reshaped to that static shape and compiled, with
OpenVINO's compiled-blob cache beside it: a new batch size costs a compile (≈1 s on the embedded model), never a
new conversion. Both caches of shapes are bounded: a runner keeps its ``max_shapes`` most recently used compiled
models (one per input shape of a batch part; each holds its own copy of the weights in the plugin's layout, its
buffers — 100-150 MB on the embedded model, UNet and decoder — and stream threads), releasing the least recently used
before it compiles another (its threads go back to OpenVINO's pool); the compiled-blob folder of a model keeps its
``BLOBS_PER_SHAPE × max_shapes`` most recently written blobs (in ``<key>/compiled``). Inference precision: bf16
where the CPU has it (``precision`` overrides), else f32. A batch runs as one OpenVINO stream per thread, each on its
part of the batch (see ``OpenVINORunner``): steady when the cores are shared.

Not converted (they run in PyTorch, fp32): calls carrying ControlNet residuals or other extra UNet inputs, and
models with switchable LoRA adapters (``optimize`` reports that).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import threading
import time
import warnings

import numpy as np
import torch

from easynlp_ldm.files import atomic_files

logger = logging.getLogger(__name__)

PRECISION_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
MAX_SHAPES = 4  # compiled models kept per runner (serve: max_cached_shapes)
BLOBS_PER_SHAPE = 4  # compiled blobs kept on disk per model, per compiled model kept in memory
CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_cache_dir() -> str:
    """Where converted IRs and compiled blobs live: ``$EASYNLP_OPENVINO_CACHE``, else
    ``$XDG_CACHE_HOME/easynlp_ldm/openvino`` (``~/.cache/easynlp_ldm/openvino``)."""
    explicit = os.environ.get("EASYNLP_OPENVINO_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "easynlp_ldm", "openvino")


_CORE = None
_CORE_LOCK = threading.Lock()


def _core():
    """The process's one ``openvino.Core``: each Core loads its own plugin state and threads, and many of them in
    one process (one per compile, as this module first did) crashed a long test run with SIGSEGV."""
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            import openvino as ov

            _CORE = ov.Core()
        return _CORE


def _without_telemetry() -> None:
    """OpenVINO's model converter sends usage data to Intel unless the user opted out (a consent file in the home
    folder): each event from a process forked from this one, which on a machine without internet waits for its
    connection, and, forked while another thread held a lock, can wait for ever, holding this process's exit with it
    (a test run hung so, in multiprocessing's join at exit). This toolkit's conversions send nothing and write nothing
    to the home folder: the converter's modules get its own no-op stand-in for the telemetry package."""
    import importlib

    from openvino.tools.ovc import telemetry_stub

    for name in ("telemetry_utils", "convert_impl", "utils"):
        module = importlib.import_module(f"openvino.tools.ovc.{name}")
        if hasattr(module, "tm"):
            module.tm = telemetry_stub


def cpu_precisions() -> set[str]:
    """The precisions OpenVINO's CPU plugin can infer in on this machine (``f32`` always)."""
    capabilities = set(_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    return {"fp32"} | {name for name, cap in CAPABILITY.items() if cap in capabilities}


def choose_precision(precision: str) -> str:
    """``precision`` ('' = the fastest this CPU has: bf16 if it has it, else fp32) → one of fp32/bf16/fp16."""
    have = cpu_precisions()
    if not precision:
        return "bf16" if "bf16" in have else "fp32"
    if precision not in have:
        raise ValueError(f"precision={precision} is not supported by OpenVINO on this CPU (it has "
                         f"{', '.join(sorted(have))}); use one of those or optimize=torch")
    return precision


def weights_key(module: torch.nn.Module, extra: dict) -> str:
    """A hash of everything the converted graph depends on: the weights (bytes), the module class and config, and
    the versions of torch, diffusers and openvino."""
    import diffusers
    import openvino

    digest = hashlib.blake2b(digest_size=16)
    config = dict(getattr(module, "config", {}) or {})
    digest.update(json.dumps({"class": type(module).__qualname__, "config": config, "extra": extra,
                              "versions": [torch.__version__, diffusers.__version__, openvino.__version__]},
                             sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class OpenVINORunner:
    """Runs ``graph`` (a torch module taking batch-first tensors, returning one tensor) with OpenVINO: one IR on disk
    per ``key``, compiled per static input shape. Thread-safe (serve calls it from its batch thread).

    A batch is split into ``streams`` parts run at once as separate OpenVINO streams of ``threads // streams``
    threads each (default: one thread per stream), rather than one request sharing all threads: the parts never wait
    for each other, so when another job takes a core the work on the other cores goes on — on 2 cores beside 2 busy
    processes a 16-image batch took 8.7 s this way against 13.0 s as one request (quiet: 4.2–4.5 s both;
    ``bench/cpu_speed.py`` measures it). A batch smaller than ``streams`` runs as fewer, wider parts. Every sample's
    computation is independent of the others (the UNet and the VAE decoder have no batch statistics).

    ``compiled`` maps each part's input shapes (and the number of parts, its streams) to its compiled model and infer
    requests, least recently used first: at most ``max_shapes`` of them (an unevenly split batch uses two, an even
    one one, and batches share them: 3 and 4 images in 2 streams both run parts of 2); ``evictions`` counts those
    released. Counting compiled models, not batch shapes, bounds the memory: each holds its own copy of the weights."""

    def __init__(self, graph: torch.nn.Module, name: str, key: str, precision: str, threads: int = 0,
                 streams: int = 0, max_shapes: int = MAX_SHAPES):
        self.graph, self.name, self.key = graph, name, key
        self.precision, self.threads = precision, threads
        self.streams = streams or threads or 1
        self.max_shapes = max_shapes
        # (part input shapes, parts) → its compiled model's infer requests (one per part: they keep it alive), least
        # recently used first
        self.compiled: collections.OrderedDict[tuple, list] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.conversions = 0  # conversions done by this runner (0 when the IR came from the cache)
        self.evictions = 0

    def resize(self, max_shapes: int) -> None:
        """Keep at most ``max_shapes`` compiled models from now on (releasing the least recently used at once)."""
        if max_shapes < 1:
            raise ValueError(f"max_shapes must be at least 1, got {max_shapes}")
        with self.lock:
            self.max_shapes = max_shapes
            self._evict(max_shapes)

    def _evict(self, keep: int, needed: frozenset = frozenset()) -> None:
        """Release the least recently used compiled models but ``needed`` until ``keep`` remain (with the lock held):
        dropping the last infer requests of a compiled model frees its memory and returns its threads to OpenVINO's
        pool."""
        for key in [key for key in self.compiled if key not in needed][:max(0, len(self.compiled) - keep)]:
            del self.compiled[key]
            self.evictions += 1
            logger.debug("OpenVINO: %s released the model compiled for %s", self.name, key)

    @property
    def blob_dir(self) -> str:
        """OpenVINO's compiled-blob cache of this model (``CACHE_DIR``), beside its IR."""
        return os.path.join(openvino_cache_dir(), self.key, "compiled")

    def _prune_blobs(self) -> None:
        """Keep the ``BLOBS_PER_SHAPE × max_shapes`` most recently written blobs of this model on disk."""
        try:
            entries = [entry for entry in os.scandir(self.blob_dir) if entry.is_file()]
        except FileNotFoundError:
            return
        entries.sort(key=lambda entry: entry.stat().st_mtime, reverse=True)
        for entry in entries[BLOBS_PER_SHAPE * self.max_shapes:]:
            try:
                os.remove(entry.path)
            except FileNotFoundError:  # another process pruned it first
                pass

    @property
    def ir_path(self) -> str:
        return os.path.join(openvino_cache_dir(), self.key, f"{self.name}.xml")

    def _ensure_ir(self, example: tuple[torch.Tensor, ...]) -> str:
        path = self.ir_path
        if os.path.isfile(path):
            return path
        import openvino as ov

        folder = os.path.dirname(path)
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        logger.info("OpenVINO: converting the %s (once per model; the IR is cached in %s) …", self.name, folder)
        start = time.perf_counter()
        _without_telemetry()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracing's TracerWarnings about diffusers' shape checks: not the user's
            converted = ov.convert_model(self.graph, example_input=example)
        # IR = .xml + .bin; the .xml last, so its presence means complete
        with atomic_files(folder, last=os.path.basename(path)) as staging:
            ov.save_model(converted, os.path.join(staging, os.path.basename(path)), compress_to_fp16=False)
        self.conversions += 1
        logger.info("OpenVINO: %s converted in %.1f s", self.name, time.perf_counter() - start)
        return path

    def _compile(self, shapes: tuple, parts: int, example: tuple[torch.Tensor, ...]):
        """The IR reshaped to these static input shapes, compiled for ``parts`` streams."""
        import openvino as ov

        core = _core()
        model = core.read_model(self._ensure_ir(example))
        model.reshape({port: ov.PartialShape(list(shape)) for port, shape in zip(model.inputs, shapes)})
        config = {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[self.precision], "NUM_STREAMS": parts,
                  "CACHE_DIR": self.blob_dir}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        start = time.perf_counter()
        compiled = core.compile_model(model, "CPU", config)
        logger.debug("OpenVINO: %s compiled for %s × %d streams in %.1f s", self.name, shapes, parts,
                     time.perf_counter() - start)
        self._prune_blobs()
        return compiled

    def _requests(self, tensors: tuple[torch.Tensor, ...]) -> list:
        """[(infer request, batch slice)]: the batch in ``min(streams, batch)`` parts, each part's compiled model
        taken from the cache (the least recently used released first when one must be compiled)."""
        batch = tensors[0].shape[0]
        parts = max(1, min(self.streams, batch))
        bounds = np.linspace(0, batch, parts + 1).round().astype(int)
        slices = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        keys = [(tuple((part.stop - part.start, *t.shape[1:]) for t in tensors), parts) for part in slices]
        requests, used = [], collections.Counter()
        for key, part in zip(keys, slices):
            if key in self.compiled:
                self.compiled.move_to_end(key)
            else:  # release first: never more than max_shapes alive (but the ones this batch needs)
                self._evict(self.max_shapes - 1, frozenset(keys))
                compiled = self._compile(*key, tuple(t[part] for t in tensors))
                # Only the requests are kept (an even split runs one compiled model in several): the last reference
                # to a CompiledModel object, dropped, held the GIL ~50 ms per stream (and /health waited); requests
                # release it without
                self.compiled[key] = [compiled.create_infer_request() for _ in range(parts)]
                del compiled
            requests.append((self.compiled[key][used[key]], part))
            used[key] += 1
        self._evict(self.max_shapes, frozenset(keys))  # what an uneven split kept past the bound last time
        return requests

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        tensors = tuple(t.detach().float().contiguous() for t in tensors)
        with self.lock:
            requests = self._requests(tensors)
            for request, part in requests:
                request.start_async([t[part].numpy() for t in tensors], share_inputs=True)
            outputs = []
            for request, _ in requests:
                request.wait()
                outputs.append(np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True))
            return torch.from_numpy(np.concatenate(outputs) if len(outputs) > 1 else outputs[0])


class _UNetGraph(torch.nn.Module):
    """What is converted: the UNet's plain call (sample, per-sample timestep, text states) → noise prediction."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):
        # the class's forward: the instance's own is the OpenVINO one by the time this is traced
        return type(self.unet).forward(self.unet, sample, timestep, encoder_hidden_states=encoder_hidden_states,
                                       return_dict=False)[0]


class _DecoderGraph(torch.nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, sample):
        return type(self.decoder).forward(self.decoder, sample)


_UNET_EXTRAS = ("class_labels", "timestep_cond", "attention_mask", "added_cond_kwargs",
                "down_block_additional_residuals", "mid_block_additional_residual",
                "down_intrablock_additional_residuals", "encoder_attention_mask")


def _unet_forward(unet, runner: OpenVINORunner):
    original = unet.forward

    def forward(sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs):
        if args or any(kwargs.get(name) is not None for name in _UNET_EXTRAS) or kwargs.get("cross_attention_kwargs"):
            # ControlNet residuals and other extras: the PyTorch UNet (fp32) computes this call
            return original(sample, timestep, encoder_hidden_states, *args, return_dict=return_dict, **kwargs)
        steps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        out = runner(sample, steps, encoder_hidden_states).to(sample.device)
        if not return_dict:
            return (out,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=out)

    forward.openvino_runner = runner
    return forward


def _decoder_forward(decoder, runner: OpenVINORunner):
    original = decoder.forward

    def forward(sample, latent_embeds=None):
        if latent_embeds is not None:
            return original(sample, latent_embeds)
        return runner(sample).to(sample.device)

    forward.openvino_runner = runner
    return forward


def _convert_unet(model, precision: str, threads: int, max_shapes: int) -> OpenVINORunner:
    unet = model.unet
    runner = OpenVINORunner(_UNetGraph(unet).eval(), "unet", weights_key(unet, {"graph": "unet"}), precision, threads,
                            max_shapes=max_shapes)
    unet.forward = _unet_forward(unet, runner)
    return runner


def _convert_vae_decoder(model, precision: str, threads: int, max_shapes: int) -> OpenVINORunner:
    decoder = model.vae.decoder
    runner = OpenVINORunner(_DecoderGraph(decoder).eval(), "vae_decoder", weights_key(decoder, {"graph": "decoder"}),
                            precision, threads, max_shapes=max_shapes)
    decoder.forward = _decoder_forward(decoder, runner)
    return runner


# The parts a model family may name in its ``openvino_parts``, each routed through OpenVINO by its converter.
CONVERTERS = {"unet": _convert_unet, "vae_decoder": _convert_vae_decoder}


def use_openvino(model, precision: str = "", threads: int = 0, max_shapes: int = MAX_SHAPES,
                 parts: tuple[str, ...] = ("unet", "vae_decoder")) -> dict:
    """Route ``parts`` of ``model`` (fp32, on CPU; its family's ``openvino_parts``: the UNet and the VAE decoder for
    SD-1.x) through OpenVINO, in place, with ``threads`` inference threads (0: torch's thread count, which
    ``easynlp_ldm.threads.configure`` set), each keeping the compiled models of ``max_shapes`` input shapes. Returns
    what was done. Conversion happens on the first call of each (it needs real shapes), then comes from the disk
    cache."""
    precision = choose_precision(precision)
    threads = threads or torch.get_num_threads()
    converted = {part: CONVERTERS[part](model, precision, threads, max_shapes) for part in parts}
    return {"backend": "openvino", "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision],
            "openvino": [part.replace("vae_", "vae.") for part in converted], "threads": threads,
            "streams": next(iter(converted.values())).streams, "max_shapes": max_shapes}


def runners(model) -> dict[str, OpenVINORunner]:
    """The OpenVINO runners of a prepared model by part (``unet``, ``vae_decoder``); empty when it runs PyTorch."""
    unet = getattr(model, "unet", None)  # a transformer family's model has none (and no OpenVINO parts)
    found = {"unet": getattr(unet.forward, "openvino_runner", None) if unet is not None else None,
             "vae_decoder": getattr(model.vae.decoder.forward, "openvino_runner", None)}
    return {part: runner for part, runner in found.items() if runner is not None}
