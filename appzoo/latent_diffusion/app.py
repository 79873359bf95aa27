"""The latent_diffusion app: one method per mode."""

from __future__ import annotations

from typing import Any

from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.hub import resolve_model


def resolve_model_path(name: str, flags: ParsedFlags, what: str) -> str:
    """A model name or folder → a local folder; empty → the embedded default model."""
    from modelzoo.pretrained import DEFAULT_MODEL, embedded_models

    embedded = embedded_models()
    if not name:
        if DEFAULT_MODEL not in embedded:
            raise UserError(f"no {what} given and the embedded default model is not installed; pass a model folder")
        name = DEFAULT_MODEL
    return resolve_model(name, embedded, flags.modelzoo_base_dir, what=what)


def load_inference_model(name: str | None, flags: ParsedFlags, params: dict | None = None):
    """``--checkpoint_dir`` (own checkpoint or diffusers layout; default: the embedded model) → eval model, with the
    ``optimize``/``precision`` of ``params`` applied when given."""
    import logging

    from easynlp_ldm import distributed
    from modelzoo.ldm import LatentDiffusion, ModelFormatError
    from modelzoo.optimize import prepare_for_inference

    path = resolve_model_path(name or "", flags, "--checkpoint_dir")
    try:
        model = LatentDiffusion.from_pretrained(path)
    except ModelFormatError as err:
        raise UserError(str(err)) from None
    model.to(distributed.model_device())
    if params is not None and "optimize" in params:
        done = prepare_for_inference(model, params["optimize"], params["precision"])
        logging.getLogger("easynlp").info("inference: %s", ", ".join(f"{k}={v}" for k, v in done.items()))
    return model


class LatentDiffusionApp:
    name = "latent_diffusion"

    def __init__(self, flags: ParsedFlags, params: dict[str, Any]):
        self.flags = flags
        self.params = params

    def run(self, mode: str) -> int:
        handler = getattr(self, f"run_{mode}", None)
        if handler is None:
            raise UserError(f"--mode={mode} is not available for app {self.name} in this version")
        return handler() or 0

    def run_train(self) -> int:
        from appzoo.latent_diffusion.train import run_train

        return run_train(self)

    def run_predict(self) -> int:
        from appzoo.latent_diffusion.predict import run_predict

        return run_predict(self)

    def run_evaluate(self) -> int:
        from appzoo.latent_diffusion.evaluate import run_evaluate

        return run_evaluate(self)

    def run_serve(self) -> int:
        from appzoo.latent_diffusion.serve import run_serve

        return run_serve(self)

    def run_export(self) -> int:
        from appzoo.latent_diffusion.export import run_export

        return run_export(self)
