"""Where a model comes from and how it is made ready: the one loading path of every mode, bench and test.

``load_model(name_or_path, device=..., optimize=..., precision=...)`` takes plain arguments: a local folder (of any
registered model family: this toolkit's checkpoint, PAI's diffusers layout, a Z-Image or Qwen-Image folder, …), an
embedded model's name, a Hugging Face or ModelScope cache entry on disk, or a ``.tar.gz`` package from
``--mode=export``; empty means the embedded default model. Nothing is ever downloaded.

A package is unpacked into a temporary folder that lives as long as the process: it is removed when the process
ends normally, on an uncaught exception and on SIGTERM (``_Unpacked``); only SIGKILL leaves it behind.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import signal
import tarfile
import tempfile
import threading

import torch

from appzoo.latent_diffusion.settings import InferenceSettings
from easynlp_ldm.errors import UserError
from easynlp_ldm.hub import resolve_model
from modelzoo import families
from modelzoo.families.base import ModelFormatError
from modelzoo.ldm import LatentDiffusion

logger = logging.getLogger("easynlp")

PACKAGE_SUFFIXES = (".tar.gz", ".tgz", ".tar")


def resolve_model_path(name: str, modelzoo_base_dir: str = "", what: str = "model") -> str:
    """A model name or folder → a local folder; empty → the embedded default model."""
    from modelzoo.pretrained import DEFAULT_MODEL, embedded_models

    embedded = embedded_models()
    if not name:
        if DEFAULT_MODEL not in embedded:
            raise UserError(f"no {what} given and the embedded default model is not installed; pass a model folder")
        name = DEFAULT_MODEL
    return resolve_model(name, embedded, modelzoo_base_dir, what=what)


class _Unpacked:
    """The temporary folders this process unpacked packages into, removed when it ends: at exit (normal, or an
    uncaught exception) and on SIGTERM. Where SIGTERM has its default action (end the process), the handler removes
    them and then ends the process by SIGTERM as before; a handler set earlier (or later, such as the server's,
    which restores this one when it is done) decides itself, and the exit removes them. Only the process that
    unpacked a folder removes it (a forked child inherits the handlers, not the folder)."""

    folders: list[str] = []
    lock = threading.RLock()  # the SIGTERM handler runs on the main thread, maybe while it holds the lock
    owner: int | None = None

    @classmethod
    def add(cls, folder: str) -> None:
        with cls.lock:
            cls.folders.append(folder)
            if cls.owner == os.getpid():
                return
            cls.owner = os.getpid()
        atexit.register(cls.remove_all)
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, cls.on_sigterm)

    @classmethod
    def remove_all(cls) -> None:
        with cls.lock:
            folders = cls.folders if os.getpid() == cls.owner else []
            cls.folders = []
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    @classmethod
    def on_sigterm(cls, signum, frame) -> None:
        cls.remove_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.raise_signal(signal.SIGTERM)


def extract_package(path: str) -> str:
    """A .tar.gz from --mode=export → a temporary model folder (paths outside it refused), removed when this
    process ends."""
    target = tempfile.mkdtemp(prefix="easynlp-model-")
    _Unpacked.add(target)
    try:
        with tarfile.open(path, "r:*") as archive:
            archive.extractall(target, filter="data")
    except (tarfile.TarError, OSError) as err:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(f"{path}: cannot unpack the model package ({err})") from None
    return target


def load_model(name_or_path: str | None = "", *, device: torch.device | str | None = None, optimize: str | None = None,
               precision: str = "", modelzoo_base_dir: str = "", what: str = "--checkpoint_dir",
               lora: str = "", lora_library: str = "", dtype: torch.dtype | None = None) -> LatentDiffusion:
    """The model in eval mode on ``device`` (default: this process's device — its GPU when it sees one, else the
    CPU), its weights in ``dtype`` before they move there (None: as its family reads them), with the LoRA adapters
    ``lora`` (``path[:scale],…``) merged into its weights, prepared for inference at ``optimize`` level
    (``none``/``auto``/``max``; None: left as loaded, for training and export), and the ``lora_library`` adapters
    (``name=path,…``) loaded beside them, switchable per call. ``what`` names the setting in error messages."""
    name = name_or_path or ""
    package = os.path.isfile(name) and name.endswith(PACKAGE_SUFFIXES)
    path = extract_package(name) if package else resolve_model_path(name, modelzoo_base_dir, what)
    logger.info("loading %s", f"{name} (unpacked in {path})" if package else path)
    try:
        model = families.load(path, dtype)
    except ModelFormatError as err:
        raise UserError(str(err)) from None
    # What the user gave, for messages and /info: the package, not the temporary folder its files are read from.
    model.package_path = os.path.abspath(name) if package else None
    if device is None:
        from easynlp_ldm.distributed import model_device

        device = model_device()
    model.to(device)
    if lora:
        from modelzoo.lora import load_adapters, parse_specs

        specs = parse_specs(lora)
        load_adapters(model, specs, fuse=True)
        logger.info("merged LoRA %s", ", ".join(f"{spec.path} × {spec.scale:g}" for spec in specs))
    if lora_library:
        from modelzoo.lora import load_adapters, parse_library

        library = parse_library(lora_library)
        load_adapters(model, tuple(library.values()), fuse=False, names=list(library))
        logger.info("LoRA adapters to choose per request: %s", ", ".join(library))
    if optimize is not None:
        from modelzoo.optimize import prepare_for_inference

        done = prepare_for_inference(model, optimize, precision)
        logger.info("inference: %s", ", ".join(f"{k}={v}" for k, v in done.items()))
    return model


def load_for_inference(flags, settings: InferenceSettings, checkpoint_dir: str | None = None) -> LatentDiffusion:
    """The model of predict, evaluate and serve: ``--checkpoint_dir`` (or ``checkpoint_dir``: one of the models
    evaluate compares) with their ``optimize``, ``precision``, ``lora`` and ``lora_library`` settings (an
    ``InferenceSettings``)."""
    name = flags.checkpoint_dir if checkpoint_dir is None else checkpoint_dir
    return load_model(name, optimize=settings.optimize, precision=settings.precision,
                      modelzoo_base_dir=flags.modelzoo_base_dir, lora=settings.lora,
                      lora_library=settings.lora_library)
