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


APPS: dict[str, AppEntry] = {
    "latent_diffusion": AppEntry(params="appzoo.latent_diffusion.params:PARAMS",
                                 app="appzoo.latent_diffusion.app:LatentDiffusionApp",
                                 pipeline="appzoo.latent_diffusion.pipeline:LatentDiffusionPipeline"),
}


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
