"""Finding the weight files of a diffusers/transformers component folder. Each file is read by
``easynlp_ldm.files.load_state_dict_file`` (safetensors, or ``torch.load(..., weights_only=True)``)."""

from __future__ import annotations

import json
import os

import torch

from easynlp_ldm.files import WeightsError, load_state_dict_file

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin",
                "pytorch_model.bin")
INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "model.safetensors.index.json",
               "diffusion_pytorch_model.bin.index.json", "pytorch_model.bin.index.json")


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
