"""The Python API, EasyNLP's factory: ``pipeline(app_name, model_path, **user_defined_parameters)``.

As in ``easynlp.pipelines.pipeline``, the first argument names the app (or one of EasyNLP's task names, or the model
itself) and the parameters are the app's user_defined_parameters — given as keyword arguments, or as EasyNLP's
``pipeline_params={...}`` dict — typed and validated by the same declaration the command line reads. The app's
pipeline class does the work; this module knows nothing of it.
"""

from __future__ import annotations

import logging
from typing import Any

from easynlp_ldm import apps
from easynlp_ldm.args import validate_parameters

logger = logging.getLogger("easynlp")


def pipeline(task_or_model: str = "latent_diffusion", model_path: str | None = None,
             pipeline_params: dict[str, Any] | None = None, *, random_seed: int = 1234, **user_defined_parameters):
    """``pipeline("latent_diffusion", "path/or/name", n_samples=1)`` → a callable: prompts → one record per image.
    As in EasyNLP, the first argument may instead be one of EasyNLP's task names (``"chinese-ldm-general"``: the model
    is ``model_path``, or the task's own model when none is given) or a model name or folder by itself
    (``pipeline("shapes-ldm-zh", pipeline_params={...})``). ``model_path`` None with the app name: the embedded
    default model. ``random_seed``: as ``--random_seed`` (the same images as predict for the same prompts)."""
    app_name, names_model = apps.app_for(task_or_model)
    if names_model and task_or_model not in apps.get_entry(app_name).tasks:
        if model_path is not None and model_path != task_or_model:
            logger.warning("pipeline(%r, %r): the first argument names the model, so model_path is ignored (as in "
                           "EasyNLP); pass pipeline(%r, %r) to use the folder", task_or_model, model_path,
                           app_name, model_path)
        model_path = task_or_model
    elif names_model and model_path is None:
        model_path = task_or_model
    pairs = list((pipeline_params or {}).items()) + list(user_defined_parameters.items())
    params, notes = validate_parameters(pairs, apps.get_params(app_name), "predict", app_name,
                                        source="pipeline()")
    for note in notes:
        logger.warning(note.replace("--mode=predict", "the Python pipeline"))
    return apps.get_pipeline_class(app_name)(model_path, params, random_seed=random_seed)
