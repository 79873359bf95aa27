"""The sampling defaults a Z-Image / Qwen-Image folder asks for (steps, guidance; Qwen-Image's true_cfg_scale), used
where the user gives none: a distilled model such as Z-Image-Turbo is made for 8–9 unguided steps, not the global 20
guided ones.

Where they come from, in order:
1. ``model_index.json``'s ``_generation_defaults`` (diffusers' call argument names: ``num_inference_steps``,
   ``guidance_scale``, ``true_cfg_scale``), which this toolkit's save and export write, so a fine-tuned or exported
   folder keeps the defaults of the folder it came from;
2. ``PUBLISHED``: folders published with such settings, known by the repository name the folder was downloaded as
   (the Hugging Face cache's ``models--<org>--<name>/snapshots/<rev>``, ModelScope's ``<org>/<name>`` or
   ``<org>--<name>/snapshots/<rev>``, or a folder named ``<name>``);
3. none: the global defaults apply.
"""

from __future__ import annotations

import os
from typing import Any

INDEX_KEY = "_generation_defaults"
# diffusers' call argument → GenerationSettings field, and the type its value must have.
ARGUMENTS = {"num_inference_steps": ("steps", int), "guidance_scale": ("guidance_scale", float),
             "true_cfg_scale": ("true_cfg_scale", float)}
# Repository name → its model card's settings (Tongyi-MAI/Z-Image-Turbo's card and diffusers' ZImagePipeline example:
# 9 steps, which are 8 transformer calls, and guidance_scale 0 since the distilled model is unguided).
PUBLISHED = {"Z-Image-Turbo": ("Tongyi-MAI/Z-Image-Turbo", {"num_inference_steps": 9, "guidance_scale": 0.0})}


class BadDefaults(ValueError):
    """``_generation_defaults`` of a model_index.json is not what this module writes."""


def folder_defaults(folder: str, index: dict) -> tuple[dict[str, Any], str]:
    """(diffusers' call arguments → values, where they come from) for the folder read from ``folder`` whose
    model_index.json is ``index``; ({}, "") where nothing is known."""
    if INDEX_KEY in index:
        return _checked(index[INDEX_KEY]), f"{INDEX_KEY} of {os.path.join(folder, 'model_index.json')}"
    name = repository_name(folder)
    for known, (repo_id, arguments) in PUBLISHED.items():
        if name.casefold() == known.casefold():
            return dict(arguments), f"{repo_id}'s model card, the folder being named {name}"
    return {}, ""


def settings_fields(arguments: dict[str, Any]) -> dict[str, Any]:
    """diffusers' call arguments → the ``GenerationSettings`` fields they set."""
    return {ARGUMENTS[name][0]: value for name, value in arguments.items()}


def repository_name(folder: str) -> str:
    """The name (without its organisation) a model folder was downloaded as: a Hugging Face or ModelScope snapshot's
    repository, else the folder's own name (ModelScope writes a name's dots as ``___``)."""
    parts = os.path.normpath(os.path.abspath(folder)).split(os.sep)
    name = parts[-3].split("--")[-1] if len(parts) >= 3 and parts[-2] == "snapshots" else parts[-1]
    return name.replace("___", ".")


def _checked(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadDefaults(f"{INDEX_KEY} must be an object of {', '.join(ARGUMENTS)}")
    checked = {}
    for name, item in value.items():
        if name not in ARGUMENTS:
            raise BadDefaults(f"{INDEX_KEY}: unknown key {name!r} (known: {', '.join(ARGUMENTS)})")
        kind = ARGUMENTS[name][1]
        if isinstance(item, bool) or not isinstance(item, int | float) or item < 0 or \
                (kind is int and (item < 1 or not float(item).is_integer())):
            raise BadDefaults(f"{INDEX_KEY}: {name}={item!r} must be a "
                              f"{'positive integer' if kind is int else 'number ≥ 0'}")
        checked[name] = kind(item)
    return checked
