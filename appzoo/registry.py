"""app_name → AppEntry: the apps of this package, registered with the framework by the ``easynlp_ldm.apps``
entry-point group (setup.py points it at ``APPS``); the framework (easynlp_ldm/apps.py) never imports this package.

Each entry names import paths: the app's params module (light: no torch, so ``--help`` is instant) and its App class
(imported only when a mode runs). Adding an app is one line here, nothing in the framework.
"""

from __future__ import annotations

from dataclasses import dataclass


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
