"""Files that are never half written, and weights that are never unpickled: the one I/O module every writer and
loader of the project uses.

* ``atomic_open(path)``: a handle on a temporary file in ``path``'s own folder (so the rename cannot cross file
  systems); on success it is flushed, fsynced and renamed over ``path``, on any failure it is removed. A reader sees
  the old file or the new one, never a mix. ``atomic_write_bytes``/``_text``, ``atomic_torch_save`` and
  ``atomic_copy`` are built on it; ``atomic_link`` replaces a file by a hard link the same way.
* ``atomic_folder(path)``: the same for a whole new folder (a tar export, a diffusers export);
  ``atomic_replace_folder(path)`` for a folder its one writer rewrites whole (a training run's state).
* ``atomic_files(folder)``: for a library that writes files by name (diffusers' LoRA weights, an OpenVINO IR): staged
  inside ``folder``, each file then fsynced and renamed over its namesake.
* ``load_state_dict_file(path)``: safetensors, or ``torch.load(..., weights_only=True)``; a general unpickle never.

All of them stage and rename through one context manager, ``_staged``.

A write that fails raises ``WriteFailed``, which is both an ``OSError`` (``errno`` kept, so callers can tell a full
disk) and a ``UserError`` (the CLI prints its one line: which file, why, and that the previous version is intact).
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from easynlp_ldm.errors import UserError


class WriteFailed(UserError, OSError):
    """Writing ``path`` failed; nothing was replaced."""

    def __init__(self, path: str, err: OSError):
        reason = err.strerror or str(err)
        self.message = f"{path}: cannot write ({reason}); the previous version, if any, is intact"
        super().__init__(self.message)
        self.errno, self.strerror, self.filename = err.errno, reason, path

    def __str__(self) -> str:
        return self.message


class WeightsError(ValueError):
    """A weight file that cannot be read safely; the message names the file."""


def _temporary_name(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (best effort: not every file system lets a folder be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _failures_named(path: str) -> Iterator[None]:
    """An ``OSError`` in the block becomes ``WriteFailed(path)``."""
    try:
        yield
    except OSError as err:
        if isinstance(err, WriteFailed):
            raise
        raise WriteFailed(path, err) from None


@contextmanager
def _staged(path: str, remove: Callable[[str], None], tmp: str | None = None) -> Iterator[str]:
    """The one staging-and-rename: the block writes ``tmp`` (by default a new name beside ``path``); when it succeeds
    ``tmp`` is renamed over ``path`` and the rename made durable, when it fails ``remove(tmp)`` clears what it left.
    An ``OSError`` becomes ``WriteFailed(path)``."""
    tmp = tmp or _temporary_name(path)
    with _failures_named(path):
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            remove(tmp)
            raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


@contextmanager
def atomic_open(path: str, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Write ``path`` through a temporary file beside it; renamed into place only when the block succeeds."""
    if "w" not in mode:
        raise ValueError("atomic_open writes whole files: use a 'w' mode")
    with _staged(path, _remove) as tmp, open(tmp, mode, encoding=encoding if "b" not in mode else None) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def atomic_write_bytes(path: str, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` of plain tensors/containers (readable with ``weights_only=True``), atomically."""
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)


def atomic_copy(source: str, path: str) -> None:
    with atomic_open(path, "wb") as handle, open(source, "rb") as src:
        shutil.copyfileobj(src, handle, 1 << 20)


def atomic_link(source: str, path: str) -> None:
    """``path`` becomes a hard link to ``source``, replacing its namesake atomically (``WriteFailed``, an
    ``OSError``, where the file system has no hard links; nothing is left behind)."""
    with _staged(path, _remove) as tmp:
        os.link(source, tmp)


@contextmanager
def atomic_folder(path: str, *, replace_empty: bool = True) -> Iterator[str]:
    """A temporary folder beside ``path``, renamed to ``path`` when the block succeeds and removed when it fails.
    ``path`` must not exist, or be an empty folder (``replace_empty``)."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not (replace_empty and os.path.isdir(path) and not os.listdir(path)):
        raise UserError(f"{path} exists and is not empty; choose a new folder")
    with _staged(path, _remove_tree) as tmp:
        os.makedirs(tmp)
        yield tmp
        if os.path.isdir(path):
            os.rmdir(path)


def previous_folder(path: str) -> str:
    """Where ``atomic_replace_folder`` keeps the folder it replaces while it swaps the new one in."""
    return path + ".old"


@contextmanager
def atomic_replace_folder(path: str) -> Iterator[str]:
    """A folder rewritten whole by its one writer: written in ``path.tmp`` (what a killed writer left there is
    cleared first), then swapped in: the current folder is renamed ``previous_folder(path)`` for the moment between
    the two renames and removed after. A kill while writing leaves the current folder as it was; a kill between the
    renames leaves it complete under ``previous_folder(path)``, where its readers look when ``path`` is missing."""
    staging, old = path + ".tmp", previous_folder(path)
    shutil.rmtree(staging, ignore_errors=True)
    with _staged(path, _remove_tree, tmp=staging):
        os.makedirs(staging)
        yield staging
        if os.path.isdir(path):
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_files(folder: str, *, last: str | None = None) -> Iterator[str]:
    """A staging folder inside ``folder`` (created if need be) for a library that writes its files by name: when the
    block succeeds each file written there is fsynced and renamed into ``folder`` over its namesake, ``last`` after
    the others (a reader that checks for it finds the rest complete). Each file is replaced atomically, the set is
    not. The staging folder is removed either way."""
    with _failures_named(folder):
        os.makedirs(folder, exist_ok=True)
    staging = _temporary_name(os.path.join(folder, "staging"))
    try:
        with _failures_named(folder):  # the library's own writes
            os.makedirs(staging)
            yield staging
        for name in sorted(os.listdir(staging), key=lambda name: (name == last, name)):
            with _staged(os.path.join(folder, name), _remove, tmp=os.path.join(staging, name)) as tmp:
                _fsync_file(tmp)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno == errno.ENOSPC


WEIGHT_WRAPPERS = ("params_ema", "params", "state_dict")


def load_state_dict_file(path: str) -> dict:
    """A plain ``{name: tensor}`` from ``.safetensors`` or a ``.bin``/``.pth``/``.ckpt`` pickle read with
    ``weights_only=True``. The wrappers trainers put around weights (basicsr's ``params_ema``/``params``, Lightning's
    ``state_dict``) are unwrapped, the EMA weights first. Raises ``WeightsError`` naming the file."""
    import torch

    if not os.path.isfile(path):
        raise WeightsError(f"{path}: file not found")
    try:
        if path.lower().endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        # Memory-mapped (zip files, what torch.save writes): the tensors stay in the page cache until used, so a
        # model loaded with assign=True holds one copy of its weights, not the file's and its own.
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err).lower() and "zip" not in str(err).lower():
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # the legacy (pre-zip) format
    except Exception as err:  # torch raises many types for corrupt or unsafe pickles
        reason = str(err).strip().split("\n")[0][:200] or type(err).__name__
        raise WeightsError(f"{path}: cannot read weights safely ({type(err).__name__}: {reason}; only plain "
                           f"tensor state dicts are accepted, pickled objects are refused)") from None
    for wrapper in WEIGHT_WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a plain state dict of tensors")
    return state
