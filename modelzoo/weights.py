"""Reading and writing weight files safely: safetensors, or ``torch.load(..., weights_only=True)``; never a general
unpickle. Writes are atomic (temporary file + rename)."""

from __future__ import annotations

import json
import os

import torch

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin")
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
               "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json")


class WeightsError(ValueError):
    """A weight file that cannot be read; the message names the file."""


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: file not found") from None
    except Exception as err:  # torch raises many types for corrupt or unsafe pickles
        reason = str(err).strip().split("\n")[0][:200]
        raise WeightsError(f"{path}: cannot read weights safely ({type(err).__name__}: {reason})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a plain state dict of tensors")
    return state


def find_weights(folder: str) -> list[str]:
    """The weight files of a diffusers/transformers component folder (one file, or the shards an index names)."""
    for name in INDEX_NAMES:
        index = os.path.join(folder, name)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
            return [os.path.join(folder, shard) for shard in shards]
    for name in WEIGHT_NAMES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return [path]
    raise WeightsError(f"{folder}: no weights ({', '.join(WEIGHT_NAMES)})")


def load_component_weights(folder: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in find_weights(folder):
        state.update(load_state_dict_file(path))
    return state


def atomic_torch_save(obj, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
