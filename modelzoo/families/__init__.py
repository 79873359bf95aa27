"""The model families and their registry: which family a folder or a model belongs to.

``FAMILIES`` maps a family's name to where its ``ModelFamily`` lives (``module:attribute``, imported on first use).
A folder is offered to the families latest registration first, so a family registered later (more specific: its own
``model_index.json`` class, or a format it shares with SD-1.x marked with its name) is asked before the SD-1.x
family, which takes every diffusers folder and checkpoint left. Adding a family is one module and one ``register``
call (or one line in ``FAMILIES``).
"""

from __future__ import annotations

import importlib

from modelzoo.families.base import ModelFamily, ModelFormatError

FAMILIES: dict[str, str | ModelFamily] = {"sd": "modelzoo.families.sd:FAMILY",
                                          "zimage": "modelzoo.families.dit:ZIMAGE",
                                          "qwenimage": "modelzoo.families.dit:QWENIMAGE",
                                          "qwenimage-edit": "modelzoo.families.dit:QWENIMAGE_EDIT",
                                          "qwenimage-edit-plus": "modelzoo.families.dit:QWENIMAGE_EDIT_PLUS"}


class UnknownModelFolder(ModelFormatError):
    """A folder no registered family recognises; the message names it and what was looked for."""


def register(name: str, family: str | ModelFamily) -> None:
    """Make ``family`` (an instance, or ``module:attribute`` naming one) known under ``name``; a later
    registration under the same name replaces the earlier one."""
    FAMILIES[name] = family


def get(name: str) -> ModelFamily:
    entry = FAMILIES[name]
    if isinstance(entry, str):
        module, _, attribute = entry.partition(":")
        entry = FAMILIES[name] = getattr(importlib.import_module(module), attribute)
    return entry


def registered() -> list[ModelFamily]:
    return [get(name) for name in list(FAMILIES)]


def family_for_folder(folder: str) -> ModelFamily:
    for family in reversed(registered()):
        if family.recognises(folder):
            return family
    raise UnknownModelFolder(
        f"{folder}: not a model folder of any family this toolkit knows ({', '.join(FAMILIES)}): expected a "
        f"diffusers-layout model (model_index.json, unet/, vae/, text_encoder/, tokenizer/) or an easynlp-ldm or "
        f"EasyNLP checkpoint (config.json + pytorch_model.bin + vocab.txt)")


def family_of(model) -> ModelFamily:
    """The family of ``model``: its class names it (``family = "<registered name>"``)."""
    return get(model.family)


def load(folder: str, dtype=None):
    """The model in ``folder``, read by the family that recognises it; where none does, the first registered family
    (SD-1.x) says what is wrong with it."""
    try:
        family = family_for_folder(folder)
    except UnknownModelFolder:
        family = get(next(iter(FAMILIES)))
    return family.load(folder, dtype)


def save(model, folder: str, **options) -> list[str]:
    """``model`` written to ``folder`` by its family (``options``: overrides, dtype, format)."""
    return family_of(model).save(model, folder, **options)
