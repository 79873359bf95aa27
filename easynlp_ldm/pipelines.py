"""The Python API, EasyNLP's factory: ``pipeline(app_name, model_path, **user_defined_parameters)``.

As in ``easynlp.pipelines.pipeline``, the first argument names the app and the parameters are the app's
user_defined_parameters — given as keyword arguments, or as EasyNLP's ``pipeline_params={...}`` dict — typed and
validated by the same declaration the command line reads. The app's pipeline class does the work; this module knows
nothing of it.
"""

from __future__ import annotations

import logging
from typing import Any

from easynlp_ldm.args import validate_parameters
from easynlp_ldm.errors import UserError

logger = logging.getLogger("easynlp")


def pipeline(task_or_model: str = "latent_diffusion", model_path: str | None = None,
             pipeline_params: dict[str, Any] | None = None, *, random_seed: int = 1234, **user_defined_parameters):
    """``pipeline("latent_diffusion", "path/or/name", n_samples=1)`` → a callable: prompts → one record per image.
    ``model_path`` None: the embedded default model. ``random_seed``: as ``--random_seed`` (the same images as
    predict for the same prompts)."""
    from appzoo import registry

    if task_or_model not in registry.APPS:
        apps = ", ".join(sorted(registry.APPS))
        raise UserError(f"pipeline({task_or_model!r}): not an app of this toolkit ({apps}); pass the app name and "
                        f"the model as model_path, e.g. pipeline('latent_diffusion', './finetuned_model')")
    pairs = list((pipeline_params or {}).items()) + list(user_defined_parameters.items())
    params, notes = validate_parameters(pairs, registry.get_params(task_or_model), "predict", task_or_model,
                                        source="pipeline()")
    for note in notes:
        logger.warning(note.replace("--mode=predict", "the Python pipeline"))
    return registry.get_pipeline_class(task_or_model)(model_path, params, random_seed=random_seed)
