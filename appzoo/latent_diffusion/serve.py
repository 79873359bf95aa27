"""``--mode=serve`` for latent_diffusion: an HTTP request mapped to ``GenerationSettings`` (``REQUEST_FIELDS``),
validated, and generated in batches by the same ``Generator`` predict uses (not a second pipeline).

What a request may bring is bounded: every text field by ``max_text_chars`` and to Unicode text (JSON may carry a
lone UTF-16 surrogate, which no tokenizer reads), every image by ``max_image_pixels`` read from the file's header
before any pixel is decoded; images are shrunk to the generation size as they are parsed (the server parses off its
event loop), so a queued request holds only what its generation needs.
"""

from __future__ import annotations

import base64
import collections
import copy
import dataclasses
import gc
import io
import logging
import os
import secrets
import warnings
from collections.abc import Callable
from typing import Any

from appzoo.latent_diffusion import openai_images
from appzoo.latent_diffusion.conditioning import ImageInputs, fit, preprocess_control
from appzoo.latent_diffusion.generation import SEED_LIMIT, Generator, Stopped
from appzoo.latent_diffusion.inputs import text_length
from appzoo.latent_diffusion.loading import load_for_inference
from appzoo.latent_diffusion.settings import (
    PARAM_NAMES,
    GenerationSettings,
    InferenceSettings,
    eta_problem,
    image_input_problem,
    pipeline_takes_strength,
    size_factor,
)
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.memory import process_figures
from easynlp_ldm.serving.batcher import Cancelled
from easynlp_ldm.serving.server import Parsed, RequestError, ServiceSettings, serve
from easynlp_ldm.tables import BadRow, decode_base64, decode_image, encode_image, encode_image_base64
from modelzoo.families import family_of, registered
from modelzoo.optimize import compiled_shapes, limit_compiled_shapes
from modelzoo.samplers import canonical_name

logger = logging.getLogger("easynlp.serve")


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {type(value).__name__}", name)
    if not low <= value <= high:
        raise RequestError(f"{name} must be between {low} and {high}, got {value}", name)
    return value


def _steps(service: LatentDiffusionService, name: str, value: Any) -> int:
    return _integer(name, value, 1, service.settings.max_steps)


def _size(service: LatentDiffusionService, name: str, value: Any) -> int:
    value = _integer(name, value, service.factor, service.max_size)
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


def _check_strings(service: LatentDiffusionService, name: str, value: Any) -> None:
    """Every string in field ``name`` (its value, or nested in it: keys, list items) is Unicode text of at most
    ``max_text_chars`` characters, or a RequestError naming the field (the string itself is never echoed)."""
    limit = service.settings.max_text_chars
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            if len(item) > limit:
                raise RequestError(f"{name}: a text of {len(item)} characters; at most {limit} are accepted "
                                   "(max_text_chars)", name)
            _check_unicode(name, item)


def _check_unicode(name: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(f"{name} is not Unicode text: character {err.start} is a lone UTF-16 surrogate "
                           f"(\\u{ord(text[err.start]):04x}); send UTF-8 text (or escape pairs that make a character)",
                           name) from None


def _sampler(service: LatentDiffusionService, name: str, value: Any) -> str:
    names = family_of(service.model).sampler_names()
    if not isinstance(value, str) or (value and canonical_name(value) not in names):
        raise RequestError(f"{name} must be one of {', '.join(names)}", name)
    problem = eta_problem(service.defaults.eta, value, service.model.scheduler_class)  # the service's ddim_eta
    if problem:
        raise RequestError(f"{name}={value!r}: this service's {problem}", name)
    return canonical_name(value) if value else ""


def _do_sr(service: LatentDiffusionService, name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(f"{name} must be true or false", name)
    if value and not service.model.esrgan_path:
        raise RequestError("this model has no super-resolution weights (RRDB_ESRGAN_x4.pth)", name)
    return value


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from an image file's header (no pixel is decoded); None when PIL cannot read it (the full
    decode then says why). PIL's own decompression-bomb limit stays on: past it, ``DecompressionBombError``."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # ours is the limit that answers
        try:
            with Image.open(io.BytesIO(data)) as probe:
                return probe.size
        except Image.DecompressionBombError:
            raise
        except Exception:
            return None


def _image(service: LatentDiffusionService, name: str, value: Any):
    """A base64 image field → RGB PIL image at its own size, or a RequestError naming the field. Its size is
    checked against ``max_image_pixels`` from the header, before its pixels are decoded."""
    from PIL import Image

    if not isinstance(value, str):
        raise RequestError(f"{name} must be a base64 string of a PNG or JPEG image (a data:image/…;base64, prefix is "
                           "allowed)", name)
    limit = service.settings.max_image_pixels
    try:
        data = decode_base64(value)
        try:
            size = _header_size(data)
        except Image.DecompressionBombError as err:
            raise RequestError(f"{name} is too large ({err}); at most {limit:,} pixels are accepted "
                               "(max_image_pixels): send it at about the generation size", name) from None
        if size and size[0] * size[1] > limit:
            raise RequestError(f"{name} is {size[0]}×{size[1]} = {size[0] * size[1]:,} pixels; at most {limit:,} are "
                               "accepted (max_image_pixels): send it at about the generation size", name)
        return decode_image(data)
    except BadRow as err:
        raise RequestError(f"{name}: {err.reason}{f' ({err.detail})' if err.detail else ''}; give a base64 PNG or "
                           "JPEG image", name) from None


def _images(service: LatentDiffusionService, body: dict, settings: GenerationSettings) -> dict:
    """The request's ``image``, ``mask`` and ``control_image``, decoded, checked and shrunk to the generation size
    (as generation would resize them): {"image", "mask", "controls"}."""
    from PIL import Image

    size = (settings.width, settings.height)
    image = mask = None
    if "image" in body:  # shrunk at once: one full-size image held at a time
        image = _image(service, "image", body["image"])
        width, height = image.size
        image = fit(image, *size)
    if "mask" in body and image is not None:  # a mask without its image is refused below, undecoded
        mask = _image(service, "mask", body["mask"]).convert("L")
        if mask.size != (width, height):
            raise RequestError(f"mask is {mask.width}×{mask.height} but image is {width}×{height}; give a mask of "
                               "the image's size (white = repaint)", "mask")
        mask = mask if mask.size == size else mask.resize(size, Image.NEAREST)
    nets = len(settings.controlnets)
    controls = None
    if "control_image" in body:
        value = body["control_image"]
        if not nets:
            raise RequestError("control_image was given but this service runs no ControlNet (start it with "
                               "controlnet=FOLDER[:scale] in --user_defined_parameters)", "control_image")
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or len(values) != nets:
            raise RequestError(f"control_image must be a list of {nets} base64 images, one per ControlNet of this "
                               f"service (controlnet=){'; or one base64 image' if nets == 1 else ''}", "control_image")
        # Preprocessed (canny) at the size sent, as predict and diffusers' users do, then shrunk for the queue.
        controls = [fit(preprocess_control(_image(service, "control_image", item), settings.control_preprocessor),
                        *size) for item in values]
    elif nets:
        raise RequestError(f"control_image is required: this service runs {nets} ControlNet(s) (controlnet=), each "
                           "needs a conditioning image", "control_image")
    if image is None and getattr(family_of(service.model), "needs_input_image", False):
        raise RequestError("image is required: this service's model edits an input image by the instruction", "image")
    problem = image_input_problem(settings.steps, settings.strength, settings.guidance_rescale,
                                  image=image is not None, mask="mask" in body, controlnet=bool(nets),
                                  takes_strength=pipeline_takes_strength(service.model, mask="mask" in body,
                                                                         controlnet=bool(nets)))
    if problem and problem.error:  # not a note: a request's strength without an image is no error
        field = "num_inference_steps" if problem.setting == "strength" and "strength" not in body else problem.setting
        raise RequestError(IMAGE_INPUT_WORDS.get(problem.setting, problem.message), field)
    return {"image": image, "mask": mask, "controls": controls}


# image_input_problem's reasons in the request's words (its fields), where generation's words name other things.
IMAGE_INPUT_WORDS = {
    "guidance_rescale": "guidance_rescale is not available with an image or a ControlNet (diffusers' pipelines for "
                        "them do not take it); set it to 0",
    "mask": "mask needs image: the mask marks (white = repaint) the part of image to repaint",
}


def _adapters(service: LatentDiffusionService, name: str, value: Any) -> tuple[tuple[str, float], ...]:
    known = service.adapter_names
    if not isinstance(value, dict) or not all(
            isinstance(scale, (int, float)) and not isinstance(scale, bool) and -4 <= scale <= 4
            for scale in value.values()):
        raise RequestError(f'{name} must be an object of adapter names and scales, like {{"style": 0.8}} (scales '
                           "within ±4)", name)
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise RequestError(f"{name}: no adapter {unknown[0]!r} here; this service has: "
                           f"{', '.join(known) or 'none (start it with lora_library=name=path)'}", name)
    return tuple(sorted((key, float(scale)) for key, scale in value.items() if scale))


def _family_setting(check: Callable[[LatentDiffusionService, str, Any], Any]):
    """``check`` for a setting only some model families' pipelines take (their ``own_settings``): refused, naming
    the field, where the service's model is of another family."""
    def checked(service: LatentDiffusionService, name: str, value: Any):
        setting, family = REQUEST_FIELDS[name][0], family_of(service.model)
        if setting not in family.own_settings:
            takers = [other.name for other in registered() if setting in other.own_settings]
            raise RequestError(f"{name} applies to {' and '.join(takers)} models only; this service's model is "
                               f"{family.name}", name)
        return check(service, name, value)

    return checked


# The HTTP request vocabulary → GenerationSettings: request field → (settings field, checker). The one mapping of a
# request's sampling settings; an absent field keeps the service's default (its user_defined_parameters).
REQUEST_FIELDS: dict[str, tuple[str, Callable[[LatentDiffusionService, str, Any], Any]]] = {
    "num_inference_steps": ("steps", _steps),
    "width": ("width", _size),
    "height": ("height", _size),
    "guidance_scale": ("guidance_scale", _guidance),
    "guidance_rescale": ("guidance_rescale", _unit),
    "strength": ("strength", _unit),
    "negative_prompt": ("negative_prompt", _text),
    "sampler": ("sampler", _sampler),
    "do_sr": ("do_sr", _do_sr),
    "lora": ("adapters", _adapters),
    "cfg_normalization": ("cfg_normalization", _family_setting(_guidance)),
    "cfg_truncation": ("cfg_truncation", _family_setting(_unit)),
    "true_cfg_scale": ("true_cfg_scale", _family_setting(_guidance)),
}
# Images a request may bring (base64 PNG/JPEG/…, a data: URI prefix allowed): per request, not settings; every image
# generated for the request uses them. ``control_image``: one per ControlNet the service runs (a string or a list).
IMAGE_FIELDS = ("image", "mask", "control_image")
# aigc_visible_label: true asks for the visible AIGC label on this request's images (the web page sets it on the
# images it offers for download); the service's aigc_visible_label=True puts it on every image.
FIELDS = ("text", "num_images", "seed", *REQUEST_FIELDS, *IMAGE_FIELDS, "aigc_visible_label")
MAX_GENERATORS = 16


class LatentDiffusionService:
    """Implements ``easynlp_ldm.serving.server.ServiceHandler``: requests whose settings are equal share a batch."""

    title = "easynlp-ldm text-to-image service"
    contract = ('PAI-EAS compatible: POST {"text", "num_inference_steps", "num_images"} → {"text", '
                '"images_base64"}')

    def __init__(self, model, settings: InferenceSettings, text_length: int | None = None):
        self.model, self.settings = model, settings
        self.text_length = text_length or model.text_max_length
        self.factor = size_factor(model)
        self.adapter_names = sorted(getattr(getattr(model, family_of(model).denoiser), "peft_config", {}) or {})
        self.max_size = settings.max_size or 2 * model.image_size
        self.defaults = settings.generation().for_model(model)
        self.labels = settings.aigc_labels()
        # One Generator per distinct settings, the least recently used dropped past MAX_GENERATORS (each holds a
        # scheduler; the model and the super-resolution net are shared by all).
        self.generators: collections.OrderedDict[GenerationSettings, Generator] = collections.OrderedDict()
        limit_compiled_shapes(model, settings.max_cached_shapes)
        # parse's own tokenizer: a fast tokenizer's padding setting is shared state, set before each encoding, and
        # parse (the server's parser thread) counting tokens unpadded beside the batch thread's padded encoding took
        # a batch's padding away (its prompts and negative prompt of different lengths: a 500)
        self.tokenizer = copy.deepcopy(model.tokenizer)

    # -------------------------------------------------------------------------------------------- requests
    def parse(self, body: Any) -> Parsed:
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object like {\"text\": \"…\", \"num_images\": 1}")
        unknown = sorted(set(body) - set(FIELDS))
        if unknown:
            name = unknown[0][:40].encode("utf-8", "backslashreplace").decode("utf-8")  # a surrogate is escaped
            why = " (it holds a lone UTF-16 surrogate: not Unicode text)" if name != unknown[0][:40] else ""
            raise RequestError(f"unknown field {name!r}{why}; fields: {', '.join(FIELDS)}", name)
        for name, value in body.items():
            if name not in IMAGE_FIELDS:  # images: base64 is ASCII, and their size has its own limit
                _check_strings(self, name, value)
        text = body.get("text")
        if not isinstance(text, str):
            raise RequestError("text is required and must be a string", "text")
        if not text.strip():
            raise RequestError("text must not be empty", "text")
        settings = dataclasses.replace(self.defaults, **{
            setting: check(self, name, body[name]) for name, (setting, check) in REQUEST_FIELDS.items()
            if name in body})
        problem = family_of(self.model).sampling_problem(settings, self.model)
        if problem:  # a setting the model's pipelines would otherwise ignore (or one they cannot honour)
            setting = problem.split("=", 1)[0]
            raise RequestError(problem, next((name for name, (field, _) in REQUEST_FIELDS.items()
                                              if setting in (name, PARAM_NAMES.get(field))), setting))
        count = _integer("num_images", body.get("num_images", 1), 1, self.settings.max_num_images)
        work = count * settings.steps * settings.width * settings.height / self.model.image_size ** 2
        if work > self.settings.max_request_work:
            raise RequestError(f"num_images × num_inference_steps × (width×height ÷ {self.model.image_size}²) is "
                               f"{work:g}; at most {self.settings.max_request_work} per request (max_request_work): "
                               "ask for fewer images or steps, or split the request", "num_images")
        seed = body.get("seed")
        if seed is None:
            seed = secrets.randbelow(SEED_LIMIT - count)
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63 - count:
            raise RequestError("seed must be an integer between 0 and 2^53 − 1 (seeds up to 2^63 from earlier "
                               "versions are accepted too)", "seed")
        images = _images(self, body, settings)
        if images["controls"] is not None:  # already preprocessed by _images
            settings = dataclasses.replace(settings, control_preprocessor="none")
        visible = body.get("aigc_visible_label", False)
        if not isinstance(visible, bool):
            raise RequestError("aigc_visible_label must be true or false", "aigc_visible_label")
        payload = {"text": text, "seeds": [seed + i for i in range(count)], "settings": settings, **images,
                   "aigc_visible_label": visible}
        # Requests share a model call when their settings are equal and they bring the same kinds of images.
        kinds = tuple(images[name] is not None for name in ("image", "mask", "controls"))
        tokens = len(self.tokenizer(text, verbose=False)["input_ids"])
        warnings = ()
        if tokens > self.text_length:
            warnings = (f"text is {tokens} tokens; the model reads the first {self.text_length} (its context) and "
                        "ignores the rest",)
        return Parsed((settings, kinds), payload, count, deterministic="seed" in body, warnings=warnings)

    def _generator(self, settings: GenerationSettings) -> Generator:
        if settings in self.generators:
            self.generators.move_to_end(settings)
        else:
            self.generators[settings] = Generator(self.model, settings, self.text_length)
            while len(self.generators) > MAX_GENERATORS:
                self.generators.popitem(last=False)
        return self.generators[settings]

    def _run(self, payloads: list[dict], should_stop: Callable[[], bool] | None = None) -> list[dict]:
        generate = self._generator(payloads[0]["settings"])
        prompts = [p["text"] for p in payloads for _ in p["seeds"]]
        seeds = [seed for p in payloads for seed in p["seeds"]]
        try:
            images = iter(generate(prompts, seeds, should_stop=should_stop, inputs=self._inputs(payloads)))
        except Stopped as stopped:
            raise Cancelled(str(stopped)) from None
        results = []
        for payload in payloads:
            encoded = [base64.b64encode(encode_image(next(images), "png", label=self.labels.label(
                visible=payload["aigc_visible_label"]))).decode("ascii") for _ in payload["seeds"]]
            results.append({"text": payload["text"], "images_base64": encoded, "seeds": payload["seeds"]})
        return results

    @staticmethod
    def _inputs(payloads: list[dict]) -> ImageInputs | None:
        """One ``ImageInputs`` for the batch (its requests bring the same kinds of images: the batch key), each
        request's images repeated for its ``num_images``."""
        first = payloads[0]
        if first.get("image") is None and first.get("controls") is None:
            return None

        def each(name):
            return None if first.get(name) is None else [p[name] for p in payloads]

        controls = None
        if first.get("controls") is not None:
            controls = [[p["controls"][k] for p in payloads] for k in range(len(first["controls"]))]
        inputs = ImageInputs(images=each("image"), masks=each("mask"), controls=controls)
        return inputs.repeat([len(p["seeds"]) for p in payloads])

    def run_batch(self, payloads: list[dict], should_stop: Callable[[], bool] | None = None) -> list[Any]:
        import torch

        with torch.inference_mode():
            try:
                return self._run(payloads, should_stop)
            except Cancelled:
                raise
            except Exception:
                if len(payloads) == 1:
                    raise
            # Something in the batch failed: run each request alone so only the culprit gets the error.
            results = []
            for payload in payloads:
                try:
                    results.extend(self._run([payload], should_stop))
                except Exception as err:
                    results.append(err)
            return results

    def warmup(self) -> None:
        body = {"text": "白色背景上的红色圆形", "num_images": 1, "seed": 0}
        # A ControlNet service needs a conditioning image, an edit model an input image: a black one
        edits = getattr(family_of(self.model), "needs_input_image", False)
        if self.defaults.controlnets or edits:
            from PIL import Image

            black = encode_image_base64(Image.new("RGB", (self.defaults.width, self.defaults.height)))
            if self.defaults.controlnets:
                body["control_image"] = [black] * len(self.defaults.controlnets)
            if edits or self._controlnet_only_inpaints():  # an inpainting ControlNet: the black image all repainted
                body["image"] = black
            if self._controlnet_only_inpaints():
                body["mask"] = encode_image_base64(Image.new("L", (self.defaults.width, self.defaults.height), 255))
        self.run_batch([self.parse(body).payload])

    def _controlnet_only_inpaints(self) -> bool:
        """Whether the service's ControlNet conditions inpainting only (its warm-up then inpaints)."""
        if not self.defaults.controlnets:
            return False
        from appzoo.latent_diffusion.generation import controlnet_of
        from modelzoo.families.base import INPAINT

        return family_of(self.model).controlnet_kinds(
            self.model, controlnet_of(self.model, self.defaults.controlnets)) == (INPAINT,)

    def describe(self) -> dict:
        """For /info: no file paths (the model's folder name only)."""
        source = getattr(self.model, "package_path", None) or getattr(self.model, "source_path", "") or ""
        return {"model": os.path.basename(os.path.normpath(source)) if source else "", "image_size":
                self.model.image_size, "super_resolution": bool(self.model.esrgan_path),
                "lora_adapters": self.adapter_names, "controlnets": len(self.defaults.controlnets),
                "fields": list(FIELDS),
                "limits": {"max_num_images": self.settings.max_num_images, "max_steps": self.settings.max_steps,
                           "max_size": self.max_size, "size_multiple": self.factor,
                           "max_request_work": self.settings.max_request_work,
                           "max_text_chars": self.settings.max_text_chars, "text_tokens": self.text_length,
                           "max_image_pixels": self.settings.max_image_pixels}}

    def routes(self) -> list:
        """Beyond the EAS contract: OpenAI's images API (openai_images.py)."""
        return [openai_images.ROUTE]

    def page(self) -> str:
        """The web page at GET / (static)."""
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")

    def gauges(self) -> list[str]:
        """For /metrics: this process's resident memory and threads, and what each bounded cache holds against its
        bound (compiled models per input shape, pipelines per settings)."""
        caches = {**compiled_shapes(self.model), "generators": (len(self.generators), MAX_GENERATORS)}
        figures = process_figures()
        lines = []
        if figures:
            lines += ["# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes "
                      f"{figures['rss_bytes']}", "# TYPE easynlp_process_threads gauge",
                      f"easynlp_process_threads {figures['threads']}"]
        for metric, column in (("easynlp_cache_entries", 0), ("easynlp_cache_capacity", 1)):
            lines.append(f"# TYPE {metric} gauge")
            lines += [f'{metric}{{cache="{name}"}} {value[column]}' for name, value in sorted(caches.items())]
        return lines


def service_settings(settings: InferenceSettings, api_token: str | None) -> ServiceSettings:
    """The server's settings from the serve parameters (``SERVER_PARAMS``: ServiceSettings field → parameter)."""
    return ServiceSettings(api_token=api_token, **{field: getattr(settings, name) for field, name in
                                                   SERVER_PARAMS.items()})


# ServiceSettings field → its user_defined_parameter (declared in params.py).
SERVER_PARAMS = {"max_batch_size": "max_batch_size", "max_wait_ms": "max_wait_ms", "max_queue": "max_queue",
                 "request_timeout_s": "request_timeout", "service_name": "service_name",
                 "max_body_bytes": "max_body_bytes", "body_timeout_s": "body_timeout",
                 "retry_grace_s": "retry_grace", "auth_max_skew_s": "auth_max_skew",
                 "auth_local_time": "auth_local_time", "docs": "docs", "keep_alive_s": "keep_alive",
                 "header_timeout_s": "header_timeout", "max_connections": "max_connections",
                 "shutdown_timeout_s": "shutdown_timeout"}


def run(flags: ParsedFlags, params: dict[str, Any]) -> int:
    inference = InferenceSettings.from_params(params)
    model = load_for_inference(flags, inference)
    token = flags.api_token or os.environ.get("EASYNLP_API_TOKEN") or None
    settings = service_settings(inference, token)
    if flags.host not in ("127.0.0.1", "localhost", "::1") and not token:
        logger.warning("listening on %s without --api_token: anyone who can reach it can use it", flags.host)
    name = settings.service_name or "<service_name>"
    logger.info("serving %s on http://%s:%d (POST /, /predict, /api/predict/%s, /v1/images/generations; GET /health, "
                "/info, /metrics; web page at /)", getattr(model, "source_path", flags.checkpoint_dir), flags.host,
                flags.port, name)
    service = LatentDiffusionService(model, inference, text_length(model, flags))
    # What exists now (the libraries, the model) lives as long as the process: out of the cyclic collector's sight,
    # so that a full collection scans only what requests make. Scanning it all (460 k objects with the embedded model)
    # took 0.29 s with the GIL held, and /health waited for it.
    gc.collect()
    gc.freeze()
    serve(service, settings, flags.host, flags.port)
    return 0
