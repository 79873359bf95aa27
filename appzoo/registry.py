"""app_name → App. The CLI looks apps up here and never imports their internals.

Each entry names two import paths: the app's params module (light: no torch, so ``--help`` is instant) and its App
class (imported only when a mode runs). Adding an app is one line here, nothing in the CLI.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from easynlp_ldm.errors import UserError


@dataclass(frozen=True)
class AppEntry:
    params: str  # "module:ATTRIBUTE" holding a sequence of easynlp_ldm.args.Param
    app: str  # "module:Class"; Class(flags, params).run(mode)
    pipeline: str = ""  # "module:Class"; Class(model_path, params, **options)(inputs) — the Python API, if any
    # EasyNLP's pipeline task names served by this app: ``pipeline(task, model_path)`` uses model_path, and
    # ``pipeline(task)`` alone the model of that name (EasyNLP's default model for the task has the task's name).
    tasks: tuple[str, ...] = ()
    models: bool = False  # pipeline("<model name or folder>") with no app name is this app's model


APPS: dict[str, AppEntry] = {
    "latent_diffusion": AppEntry(params="appzoo.latent_diffusion.params:PARAMS",
                                 app="appzoo.latent_diffusion.app:LatentDiffusionApp",
                                 pipeline="appzoo.latent_diffusion.pipeline:LatentDiffusionPipeline",
                                 tasks=("chinese-ldm-general", "chinese-ldm-fashion", "chinese-ldm-art",
                                        "chinese-ldm-poem", "chinese-ldm-anime", "chinese-ldm-pet",
                                        "chinese-ldm-food", "stable-diffusion-general"),
                                 models=True),
}


def app_for(task_or_model: str) -> tuple[str, bool]:
    """EasyNLP's first pipeline argument → (app name, whether the argument itself names the model): an app name or
    one of EasyNLP's task names → that app (the model is model_path, or the task's own model); anything else is a
    model name or folder of the app that takes models by name, as in EasyNLP's ``pipeline('<model name>')``."""
    for name, entry in APPS.items():
        if task_or_model == name:
            return name, False
        if task_or_model in entry.tasks:
            return name, True
    return next(name for name, entry in APPS.items() if entry.models), True


def _load(path: str):
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def get_entry(name: str) -> AppEntry:
    try:
        return APPS[name]
    except KeyError:
        raise UserError(f"--app_name={name} is not an app of this toolkit; available: {', '.join(sorted(APPS))}") \
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
