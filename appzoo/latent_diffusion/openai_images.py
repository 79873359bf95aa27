"""OpenAI's images API (``POST /v1/images/generations``) over the EAS contract, so OpenAI clients and tool frameworks
can use the service: ``{"prompt", "n", "size": "WxH", "response_format": "b64_json"}`` →
``{"created", "data": [{"b64_json"}]}``. The generation fields of the EAS contract (``seed``, ``negative_prompt``,
``num_inference_steps``, ``guidance_scale``, …) may be sent as well (the ``openai`` package's ``extra_body``).
"""

from __future__ import annotations

import re
import time
from typing import Any

from easynlp_ldm.serving.errors import RequestError
from easynlp_ldm.serving.server import ApiRoute

PREFIX = "/v1/"  # OpenAI's routes: every answer under it (404, 405, 5xx … included) is in OpenAI's error shape
IGNORED = ("model", "user")  # any model name is this service's model; user is the caller's own end-user id
SUPPORTED = {"response_format": ("b64_json",), "output_format": ("png",), "quality": ("auto", "standard"),
             "moderation": ("auto", "low")}


def to_contract(body: Any) -> dict:
    """An OpenAI images request → the EAS contract's body (``RequestError`` names the OpenAI field)."""
    if not isinstance(body, dict):
        raise RequestError('the body must be a JSON object like {"prompt": "…", "n": 1}')
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError("prompt is required and must be a string", "prompt")
    contract = {name: value for name, value in body.items()
                if name not in ("prompt", "n", "size", *IGNORED, *SUPPORTED)}
    if "text" in contract or "num_images" in contract or "width" in contract or "height" in contract:
        name = next(n for n in ("text", "num_images", "width", "height") if n in contract)
        raise RequestError(f"{name} is not an images API field; use prompt, n and size", name)
    contract.update(text=prompt, num_images=body.get("n", 1))
    for name, allowed in SUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise RequestError(f"{name} must be one of {', '.join(allowed)} (this service returns base64 PNG)", name)
    size = body.get("size", "auto")
    if size not in ("auto", None):
        match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", size) if isinstance(size, str) else None
        if not match:
            shown = repr(size) if len(repr(size)) <= 40 else repr(size)[:40] + "…"  # never a request's text echoed back
            raise RequestError(f"size must be WIDTHxHEIGHT like 512x512, or auto; got {shown}", "size")
        contract.update(width=int(match.group(1)), height=int(match.group(2)))
    return contract


def field_name(contract_field: str | None) -> str | None:
    """The OpenAI name of a contract field, for error messages."""
    return {"text": "prompt", "num_images": "n", "width": "size", "height": "size"}.get(contract_field or "",
                                                                                         contract_field)


def error(status: int, message: str, contract_field: str | None = None) -> dict:
    """OpenAI's error object for an answer other than 200 (what the ``openai`` package parses into its
    ``APIStatusError``: ``message``, ``type``, ``param``, ``code``); the field is named as OpenAI names it."""
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    param = field_name(contract_field)
    message = message if param == contract_field else f"{param}: {message}"
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def from_contract(result: dict) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": image} for image in result["images_base64"]]}


ROUTE = ApiRoute(path="/v1/images/generations", prefix=PREFIX, name="OpenAI images API",
                 summary="Generate images (OpenAI's images API)", to_contract=to_contract, from_contract=from_contract,
                 error=error, queue_full_status=429)  # OpenAI's "rate limited": its clients retry it
