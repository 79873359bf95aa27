"""The apps of this installation, found by their registration: the ``easynlp_ldm.apps`` entry-point group, which an
app's distribution declares in its setup.py. The framework imports no app package: the command line and the Python
API look apps up here by name.

Each entry of the group loads a mapping app_name → entry (this toolkit's is ``appzoo.registry:APPS``); an entry has

* ``params``: ``"module:ATTRIBUTE"`` holding a sequence of ``easynlp_ldm.args.Param`` (imported for ``--help``: it must
  not import torch, so that help is instant);
* ``app``: ``"module:Class"``; ``Class(flags, params).run(mode)`` runs a mode (imported only when one runs);
* ``pipeline``: ``"module:Class"`` or ``""``; ``Class(model_path, params, **options)(inputs)``: the Python API;
* ``tasks``: EasyNLP's pipeline task names served by the app (``pipeline(task)``: the model of the task's name);
* ``models``: whether ``pipeline("<model name or folder>")`` with no app name is this app's model.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Mapping
from typing import Any

from easynlp_ldm.errors import UserError

GROUP = "easynlp_ldm.apps"


@functools.cache
def _registrations() -> tuple[Mapping[str, Any], ...]:
    return tuple(entry_point.load() for entry_point in importlib.metadata.entry_points(group=GROUP))


def registered() -> dict[str, Any]:
    """app_name → entry, from every registration of the group (read once per process; the mappings stay live)."""
    apps = {name: entry for registration in _registrations() for name, entry in registration.items()}
    if not apps:
        raise UserError(f"no app is registered (entry-point group {GROUP}): install the toolkit with "
                        f"pip install -e <its folder>")
    return apps


def app_for(task_or_model: str) -> tuple[str, bool]:
    """EasyNLP's first pipeline argument → (app name, whether the argument itself names the model): an app name or
    one of EasyNLP's task names → that app (the model is model_path, or the task's own model); anything else is a
    model name or folder of the app that takes models by name, as in EasyNLP's ``pipeline('<model name>')``."""
    apps = registered()
    for name, entry in apps.items():
        if task_or_model == name:
            return name, False
        if task_or_model in entry.tasks:
            return name, True
    return next(name for name, entry in apps.items() if entry.models), True


def _load(path: str):
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def get_entry(name: str):
    apps = registered()
    try:
        return apps[name]
    except KeyError:
        raise UserError(f"--app_name={name} is not an app of this toolkit; available: {', '.join(sorted(apps))}") \
            from None


def get_params(name: str):
    return list(_load(get_entry(name).params))


def get_app_class(name: str):
    return _load(get_entry(name).app)


def get_pipeline_class(name: str):
    entry = get_entry(name)
    if not entry.pipeline:
        raise UserError(f"app {name} has no Python pipeline")
    return _load(entry.pipeline)
