"""``--mode=serve`` for latent_diffusion: an HTTP request mapped to ``GenerationSettings`` (``REQUEST_FIELDS``),
validated, and generated in batches by the same ``Generator`` predict uses (not a second pipeline)."""

from __future__ import annotations

import base64
import dataclasses
import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

from appzoo.latent_diffusion.generation import GenerationSettings, Generator, size_factor
from appzoo.latent_diffusion.inputs import text_length
from appzoo.latent_diffusion.loading import load_model
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.serving.server import RequestError, ServiceSettings, serve
from easynlp_ldm.tables import encode_image
from modelzoo.samplers import canonical_name, sampler_names

logger = logging.getLogger("easynlp.serve")


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {type(value).__name__}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", name)
    return value


def _steps(service: LatentDiffusionService, name: str, value: Any) -> int:
    return _integer(name, value, 1, service.params["max_steps"])


def _size(service: LatentDiffusionService, name: str, value: Any) -> int:
    value = _integer(name, value, service.factor, service.params["max_size"])
    if value % service.factor:
        raise RequestError(f"{name} must be a multiple of {service.factor}, got {value}", name)
    return value


def _guidance(service: LatentDiffusionService, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 50:
        raise RequestError(f"{name} must be a number between 0 and 50", name)
    return float(value)


def _unit(service: LatentDiffusionService, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise RequestError(f"{name} must be a number between 0 and 1", name)
    return float(value)


def _text(service: LatentDiffusionService, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RequestError(f"{name} must be a string", name)
    return value


def _sampler(service: LatentDiffusionService, name: str, value: Any) -> str:
    if not isinstance(value, str) or (value and canonical_name(value) not in sampler_names()):
        raise RequestError(f"{name} must be one of {', '.join(sampler_names())}", name)
    return canonical_name(value) if value else ""


def _do_sr(service: LatentDiffusionService, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false", name)
    if value and not service.model.esrgan_path:
        raise RequestError("this model has no super-resolution weights (RRDB_ESRGAN_x4.pth)", name)
    return value


# The HTTP request vocabulary → GenerationSettings: request field → (settings field, checker). The one mapping of a
# request's sampling settings; an absent field keeps the service's default (its user_defined_parameters).
REQUEST_FIELDS: dict[str, tuple[str, Callable[[LatentDiffusionService, str, Any], Any]]] = {
    "num_inference_steps": ("steps", _steps),
    "width": ("width", _size),
    "height": ("height", _size),
    "guidance_scale": ("guidance_scale", _guidance),
    "guidance_rescale": ("guidance_rescale", _unit),
    "negative_prompt": ("negative_prompt", _text),
    "sampler": ("sampler", _sampler),
    "do_sr": ("do_sr", _do_sr),
}
FIELDS = ("text", "num_images", "seed", *REQUEST_FIELDS)


class LatentDiffusionService:
    """Implements ``easynlp_ldm.serving.server.ServiceHandler``: requests whose settings are equal share a batch."""

    def __init__(self, model, params: dict[str, Any], text_length: int | None = None):
        self.model, self.params, self.text_length = model, params, text_length
        self.factor = size_factor(model)
        self.defaults = GenerationSettings.from_params(params).for_model(model)
        self.generators: dict[GenerationSettings, Generator] = {}

    # -------------------------------------------------------------------------------------------- requests
    def parse(self, body: Any):
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object like {\"text\": \"…\", \"num_images\": 1}")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            raise RequestError(f"unknown field {unknown[0]!r}; fields: {', '.join(FIELDS)}", unknown[0])
        text = body.get("text")
        if not isinstance(text, str):
            raise RequestError("text is required and must be a string", "text")
        if not text.strip():
            raise RequestError("text must not be empty", "text")
        settings = dataclasses.replace(self.defaults, **{
            setting: check(self, name, body[name]) for name, (setting, check) in REQUEST_FIELDS.items()
            if name in body})
        count = _integer("num_images", body.get("num_images", 1), 1, self.params["max_num_images"])
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**62)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - count:
            raise RequestError("seed must be an integer between 0 and 2^63", "seed")
        payload = {"text": text, "seeds": [seed + i for i in range(count)], "settings": settings}
        return settings, payload, count

    def _generator(self, settings: GenerationSettings) -> Generator:
        if settings not in self.generators:
            self.generators[settings] = Generator(self.model, settings, self.text_length)
        return self.generators[settings]

    def _run(self, payloads: list[dict]) -> list[dict]:
        generate = self._generator(payloads[0]["settings"])
        prompts = [p["text"] for p in payloads for _ in p["seeds"]]
        seeds = [seed for p in payloads for seed in p["seeds"]]
        images = iter(generate(prompts, seeds))
        results = []
        for payload in payloads:
            encoded = [base64.b64encode(encode_image(next(images), "png")).decode("ascii") for _ in payload["seeds"]]
            results.append({"text": payload["text"], "images_base64": encoded, "seeds": payload["seeds"]})
        return results

    def run_batch(self, payloads: list[dict]) -> list[Any]:
        import torch

        with torch.inference_mode():
            try:
                return self._run(payloads)
            except Exception:
                if len(payloads) == 1:
                    raise
            # Something in the batch failed: run each request alone so only the culprit gets the error.
            results = []
            for payload in payloads:
                try:
                    results.extend(self._run([payload]))
                except Exception as err:
                    results.append(err)
            return results

    def warmup(self) -> None:
        body = {"text": "白色背景上的红色圆形", "num_images": 1, "seed": 0}
        key, payload, _ = self.parse(body)
        self.run_batch([payload])

    def describe(self) -> dict:
        return {"model": getattr(self.model, "source_path", ""), "image_size": self.model.image_size,
                "super_resolution": bool(self.model.esrgan_path)}


def run(flags: ParsedFlags, params: dict[str, Any]) -> int:
    model = load_model(flags.checkpoint_dir, optimize=params["optimize"], precision=params["precision"],
                       modelzoo_base_dir=flags.modelzoo_base_dir)
    token = flags.api_token or os.environ.get("EASYNLP_API_TOKEN") or None
    settings = ServiceSettings(max_batch_size=params["max_batch_size"], max_wait_ms=params["max_wait_ms"],
                               max_queue=params["max_queue"], request_timeout_s=params["request_timeout"],
                               api_token=token)
    if flags.host not in ("127.0.0.1", "localhost", "::1") and not token:
        logger.warning("listening on %s without --api_token: anyone who can reach it can use it", flags.host)
    logger.info("serving %s on http://%s:%d (POST / or /predict, GET /health, /metrics, /docs; web page at /)",
                getattr(model, "source_path", flags.checkpoint_dir), flags.host, flags.port)
    serve(LatentDiffusionService(model, params, text_length(model, flags)), settings, flags.host, flags.port,
          params["keep_alive"])
    return 0
