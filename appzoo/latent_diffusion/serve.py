"""``--mode=serve`` for latent_diffusion: request validation and batched generation through predict's
``Generator`` (the same predict step, not a second pipeline)."""

from __future__ import annotations

import base64
import logging
import os
import secrets
import shutil
import tarfile
import tempfile
from typing import Any

from easynlp_ldm.errors import UserError
from easynlp_ldm.serving.server import RequestError, ServiceSettings, serve
from easynlp_ldm.tables import encode_image
from modelzoo.samplers import canonical_name, sampler_names

logger = logging.getLogger("easynlp.serve")

FIELDS = ("text", "num_inference_steps", "num_images", "guidance_scale", "seed", "negative_prompt", "width",
          "height", "sampler", "do_sr")


def _int_field(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {type(value).__name__}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", name)
    return value


class LatentDiffusionService:
    """Implements ``easynlp_ldm.serving.server.ServiceHandler``."""

    def __init__(self, model, params: dict[str, Any], text_length: int | None = None):
        from appzoo.latent_diffusion.predict import Generator  # noqa: F401  (fail early if unavailable)

        self.model, self.params, self.text_length = model, params, text_length
        from appzoo.latent_diffusion.predict import size_factor

        self.factor = size_factor(model)
        self.generators: dict[tuple, Any] = {}

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
        params = self.params
        steps = _int_field(body, "num_inference_steps", params["ddim_steps"], 1, params["max_steps"])
        count = _int_field(body, "num_images", 1, 1, params["max_num_images"])
        size = {}
        for name in ("width", "height"):
            value = _int_field(body, name, self.model.image_size, self.factor, params["max_size"])
            if value % self.factor:
                raise RequestError(f"{name} must be a multiple of {self.factor}, got {value}", name)
            size[name] = value
        guidance = body.get("guidance_scale", params["scale"])
        if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= 50:
            raise RequestError("guidance_scale must be a number between 0 and 50", "guidance_scale")
        negative = body.get("negative_prompt", params["negative_prompt"])
        if not isinstance(negative, str):
            raise RequestError("negative_prompt must be a string", "negative_prompt")
        sampler = body.get("sampler", params["sampler"])
        if not isinstance(sampler, str) or (sampler and canonical_name(sampler) not in sampler_names()):
            raise RequestError(f"sampler must be one of {', '.join(sampler_names())}", "sampler")
        do_sr = body.get("do_sr", params["do_sr"])
        if not isinstance(do_sr, bool):
            raise RequestError("do_sr must be true or false", "do_sr")
        if do_sr and not self.model.esrgan_path:
            raise RequestError("this model has no super-resolution weights (RRDB_ESRGAN_x4.pth)", "do_sr")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(2**62)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - count:
            raise RequestError("seed must be an integer between 0 and 2^63", "seed")
        key = (steps, float(guidance), size["height"], size["width"], canonical_name(sampler) if sampler else "",
               negative, do_sr)
        return key, {"text": text, "seeds": [seed + i for i in range(count)], "key": key}, count

    def _generator(self, key: tuple):
        from appzoo.latent_diffusion.predict import Generator

        if key not in self.generators:
            steps, guidance, height, width, sampler, negative, do_sr = key
            params = {**self.params, "ddim_steps": steps, "scale": guidance, "H": height, "W": width,
                      "sampler": sampler, "negative_prompt": negative, "do_sr": do_sr}
            self.generators[key] = Generator(self.model, params, self.text_length)
        return self.generators[key]

    def _run(self, payloads: list[dict]) -> list[dict]:
        generate = self._generator(payloads[0]["key"])
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


def extract_package(path: str) -> str:
    """A .tar.gz from --mode=export → a temporary model folder (paths outside it refused)."""
    target = tempfile.mkdtemp(prefix="easynlp-model-")
    try:
        with tarfile.open(path, "r:*") as archive:
            archive.extractall(target, filter="data")
    except (tarfile.TarError, OSError) as err:
        shutil.rmtree(target, ignore_errors=True)
        raise UserError(f"{path}: cannot unpack the model package ({err})") from None
    return target


def run_serve(app) -> int:
    from appzoo.latent_diffusion.app import load_inference_model

    flags, params = app.flags, app.params
    source = flags.checkpoint_dir
    if source and os.path.isfile(source) and source.endswith((".tar.gz", ".tgz", ".tar")):
        source = extract_package(source)
    model = load_inference_model(source, flags, params)
    text_length = model.clamp_text_length(flags.sequence_length if "sequence_length" in flags.given else None)
    token = flags.api_token or os.environ.get("EASYNLP_API_TOKEN") or None
    settings = ServiceSettings(max_batch_size=params["max_batch_size"], max_wait_ms=params["max_wait_ms"],
                               max_queue=params["max_queue"], request_timeout_s=params["request_timeout"],
                               api_token=token)
    if flags.host not in ("127.0.0.1", "localhost", "::1") and not token:
        logger.warning("listening on %s without --api_token: anyone who can reach it can use it", flags.host)
    logger.info("serving %s on http://%s:%d (POST / or /predict, GET /health, /metrics, /docs; web page at /)",
                getattr(model, "source_path", source), flags.host, flags.port)
    serve(LatentDiffusionService(model, params, text_length), settings, flags.host, flags.port, params["keep_alive"])
    return 0
