"""Models shipped inside the package, reachable by name (``pretrain_model_name_or_path=NAME``) and used by default
when predict, evaluate, serve or export are given no model."""

from __future__ import annotations

import os

DEFAULT_MODEL = "shapes-ldm-zh"
HERE = os.path.dirname(os.path.abspath(__file__))


def embedded_models() -> dict[str, str]:
    """Name → folder, for every complete model folder beside this file: this toolkit's checkpoint, or a diffusers
    pipeline folder (shapes-dit-zh)."""
    found = {}
    for name in sorted(os.listdir(HERE)):
        folder = os.path.join(HERE, name)
        if os.path.isfile(os.path.join(folder, "model_index.json")) or (os.path.isfile(
                os.path.join(folder, "config.json")) and os.path.isfile(os.path.join(folder, "pytorch_model.bin"))):
            found[name] = folder
    return found


def embedded_controlnets() -> dict[str, str]:
    """Name → folder, for every diffusers ControlNet folder beside this file (``controlnet=NAME``)."""
    import json

    found = {}
    for name in sorted(os.listdir(HERE)):
        config = os.path.join(HERE, name, "config.json")
        try:
            with open(config, encoding="utf-8") as handle:
                if json.load(handle).get("_class_name") == "ControlNetModel":
                    found[name] = os.path.dirname(config)
        except (OSError, ValueError):
            continue
    return found
