"""The HTTP service: a PAI-EAS-compatible JSON API with dynamic batching, limits, Prometheus metrics and a web page.

It knows nothing of diffusion: an app hands it a ``ServiceHandler`` that turns a JSON body into a batchable job
(or a ``RequestError`` naming the bad field) and runs batches of jobs with the app's own predict step.

Status codes (EAS's in brackets where they differ): 200 ok; 400 bad request (JSON, field, limits); 401 missing or
wrong token; 404; 405 wrong method; 408 the request waited past its time limit without starting; 429 queue full, with
``Retry-After`` (EAS answers 450); 500 the model step failed for this request (EAS: 400 "processor exception");
503 still warming up or shutting down; 504 the request started but did not finish within its time limit.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse

from easynlp_ldm.serving.batcher import Batcher, Job, QueueFull

logger = logging.getLogger("easynlp.serve")

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class RequestError(Exception):
    """A client mistake; ``field`` names the offending JSON field (or None for the body as a whole)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ServiceHandler(Protocol):
    def parse(self, body: Any) -> tuple[Hashable, Any, int]: ...  # (batch key, payload, units) or RequestError

    def run_batch(self, payloads: list[Any]) -> list[Any]: ...  # a result or an Exception per payload

    def warmup(self) -> None: ...

    def describe(self) -> dict: ...


@dataclass
class ServiceSettings:
    max_batch_size: int = 8
    max_wait_ms: float = 50.0
    max_queue: int = 64
    request_timeout_s: float = 300.0
    api_token: str | None = None


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += value
        self.count += 1

    def render(self, name: str) -> list[str]:
        lines = [f"# TYPE {name} histogram"]
        for bound, count in zip(self.buckets, self.counts):
            lines.append(f'{name}_bucket{{le="{bound}"}} {count}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.total}", f"{name}_count {self.count}"]
        return lines


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict[int, int] = {}
        self.latency = Histogram(LATENCY_BUCKETS)
        self.batch_sizes = Histogram(BATCH_BUCKETS)

    def record(self, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[status] = self.requests.get(status, 0) + 1
            self.latency.observe(seconds)

    def record_batch(self, units: int) -> None:
        with self.lock:
            self.batch_sizes.observe(units)

    def render(self, queue_depth: int, ready: bool) -> str:
        with self.lock:
            lines = ["# TYPE easynlp_requests_total counter"]
            lines += [f'easynlp_requests_total{{status="{s}"}} {n}' for s, n in sorted(self.requests.items())]
            lines += self.latency.render("easynlp_request_latency_seconds")
            lines += self.batch_sizes.render("easynlp_batch_size_images")
        lines += ["# TYPE easynlp_queue_depth gauge", f"easynlp_queue_depth {queue_depth}",
                  "# TYPE easynlp_ready gauge", f"easynlp_ready {int(ready)}"]
        return "\n".join(lines) + "\n"


def create_app(handler: ServiceHandler, settings: ServiceSettings):
    state = {"ready": False, "batcher": None, "warmup_error": None}
    metrics = Metrics()

    def start() -> None:
        try:
            handler.warmup()
            state["batcher"] = Batcher(handler_batch, max_batch_size=settings.max_batch_size,
                                       max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
                                       on_batch=metrics.record_batch)
            state["ready"] = True
            logger.info("ready: warmed up, batching up to %d images, waiting up to %.0f ms",
                        settings.max_batch_size, settings.max_wait_ms)
        except Exception as err:  # keep serving /health with the reason
            state["warmup_error"] = f"{type(err).__name__}: {err}"
            logger.exception("warm-up failed")

    def handler_batch(jobs: list[Job]) -> list[Any]:
        return handler.run_batch([job.payload for job in jobs])

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=start, name="easynlp-warmup", daemon=True).start()
        yield
        state["ready"] = False
        if state["batcher"] is not None:
            await asyncio.get_running_loop().run_in_executor(None, state["batcher"].close)

    app = FastAPI(title="easynlp-ldm text-to-image service", lifespan=lifespan,
                  description="PAI-EAS compatible: POST {\"text\", \"num_inference_steps\", \"num_images\"} → "
                              "{\"text\", \"images_base64\"}")

    def error(status: int, message: str, field: str | None = None, headers: dict | None = None):
        body = {"error": message}
        if field is not None:
            body["field"] = field
        return JSONResponse(body, status_code=status, headers=headers)

    def authorised(request: Request) -> bool:
        if not settings.api_token:
            return True
        given = request.headers.get("authorization", "")
        if given.lower().startswith("bearer "):
            given = given[7:]
        return hmac.compare_digest(given.strip().encode(), settings.api_token.encode())

    async def generate(request: Request):
        started = time.monotonic()
        response = await _generate(request)
        metrics.record(response.status_code, time.monotonic() - started)
        return response

    async def _generate(request: Request):
        if not authorised(request):
            return error(401, "authentication failed: send Authorization: Bearer <token>",
                         headers={"WWW-Authenticate": "Bearer"})
        if not state["ready"]:
            reason = state["warmup_error"] or "the model is still warming up"
            return error(503, reason, headers={"Retry-After": "5"})
        raw = await request.body()
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            return error(400, f"malformed JSON body: {err}")
        try:
            key, payload, units = handler.parse(body)
        except RequestError as err:
            return error(400, str(err), err.field)
        if units > settings.max_batch_size:
            units = settings.max_batch_size  # a large request runs alone rather than never
        batcher: Batcher = state["batcher"]
        try:
            job = batcher.submit(key, payload, units)
        except QueueFull as err:
            return error(429, f"queue full ({err}); retry later", headers={"Retry-After": "1"})
        try:
            result = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(job.future)),
                                            timeout=settings.request_timeout_s)
        except asyncio.TimeoutError:
            if batcher.cancel(job):
                return error(408, f"request waited more than {settings.request_timeout_s:g} s in the queue")
            return error(504, f"request did not finish within {settings.request_timeout_s:g} s")
        except Exception as err:
            logger.exception("request failed")
            return error(500, f"generation failed: {type(err).__name__}: {err}")
        return JSONResponse(result)

    app.add_api_route("/", generate, methods=["POST"], summary="Generate images (EAS contract)")
    app.add_api_route("/predict", generate, methods=["POST"], summary="Generate images (same as POST /)")

    @app.get("/health")
    def health():
        if state["ready"]:
            return {"status": "ready", **handler.describe()}
        status = "failed: " + state["warmup_error"] if state["warmup_error"] else "warming up"
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        batcher = state["batcher"]
        return metrics.render(batcher.depth if batcher else 0, state["ready"])

    @app.get("/", response_class=HTMLResponse)
    def page():
        with open(os.path.join(STATIC, "index.html"), encoding="utf-8") as handle:
            return handle.read()

    return app


def serve(handler: ServiceHandler, settings: ServiceSettings, host: str, port: int, keep_alive_s: int = 75) -> None:
    import uvicorn

    app = create_app(handler, settings)
    # Image requests take seconds: keep connections alive for minutes as EAS image services do.
    uvicorn.run(app, host=host, port=port, timeout_keep_alive=keep_alive_s, timeout_graceful_shutdown=None,
                log_level=os.environ.get("EASYNLP_LOG_LEVEL", "info").lower())
