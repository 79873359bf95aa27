"""The HTTP service: the PAI-EAS contract, and the routes and web page an app supplies, over dynamic batching, with
limits, cancellation and Prometheus metrics.

It knows nothing of diffusion nor of an app's formats: an app hands it a ``ServiceHandler`` that turns a JSON body
into a batchable job (or a ``RequestError`` naming the bad field), runs batches of jobs with the app's own predict
step, and names its other APIs over the contract (``ApiRoute``: e.g. the image app's OpenAI images API) and its page.

Routes: ``POST /``, ``/predict``, ``/api/predict/<service_name>`` (the EAS contract; EAS's gateway path, so the
official SDK works without ``custom_url``), the handler's ``routes()`` (POST), ``GET /`` (the handler's ``page()``),
``GET /health`` (liveness/readiness, public), ``GET /info``, ``GET /metrics``, ``GET /openapi.json`` and ``/docs``
(with ``docs=True``). With a token, every route but ``/health``, the static page and ``/favicon.ico`` needs it.

Status codes (EAS's): 200; 400 bad request (JSON, field, limits); 401 missing or wrong token, or an EAS signature
already served (a replay, see auth.py); 404; 405; 408 the request waited in the queue past its time limit, or its
body or headers did not arrive in time; 413 body too large; 450 queue full, with ``Retry-After`` (an app's route may
answer another status: OpenAI's 429, which OpenAI clients retry); 500 the model step failed for this request, or a
fault of the service; 503 warming up, shutting down, or past ``max_connections``, with ``Retry-After``; 504 the
request started but did not finish in time. Every answer of every route, the server's own included (connections.py),
is in that route's format: ``{"error": "<one line>", "field": …}``, or an app route's own under its prefix (e.g.
OpenAI's error object under ``/v1/``; ``ErrorFormat``).

On SIGTERM the service stops taking work: queued requests are answered 503 at once, the running batch finishes
(``shutdown_timeout_s``), and meanwhile the socket stays open, so that ``/health`` answers 503 "shutting down" (what
a load balancer's readiness probe reads) and new requests 503; then it closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from easynlp_ldm.serving import auth
from easynlp_ldm.serving.batcher import Batcher, Job, QueueFull, ShuttingDown
from easynlp_ldm.serving.errors import Problem, RequestError
from easynlp_ldm.serving.metrics import Metrics

__all__ = ["ApiRoute", "Parsed", "Problem", "RequestError", "ServiceHandler", "ServiceSettings", "build_server",
           "create_app", "serve"]

logger = logging.getLogger("easynlp.serve")

MAX_JSON_DEPTH = 32  # nesting of arrays/objects in a request body
MAX_INT_DIGITS = 20  # digits of an integer in a request body (seeds are below 2^63: 19 digits)
POLL_S = 0.05  # how often a waiting request checks that its client is still there


@dataclass(frozen=True)
class Parsed:
    key: Hashable  # requests with equal keys may share a model call
    payload: Any
    units: int  # images
    deterministic: bool = False  # the result depends on the body alone (e.g. an explicit seed)
    warnings: tuple[str, ...] = ()  # told to the client in the answer's "warnings"


@dataclass(frozen=True)
class ApiRoute:
    """Another API's POST route over the handler's contract: its body is translated to the contract's, the contract's
    answer to its own, and every answer under ``prefix`` (404, 405 and 5xx included) is in its error format."""

    path: str  # e.g. "/v1/images/generations"
    prefix: str  # e.g. "/v1/"
    name: str  # in the service's description: "<name> at <path>"
    summary: str  # of the route, in /docs
    to_contract: Callable[[Any], Any]  # its JSON body → the contract's (a RequestError names the field)
    from_contract: Callable[[dict], dict]  # the contract's answer → its own
    error: Callable[[int, str, str | None], dict]  # (status, one-line message, the contract's field) → its error body
    queue_full_status: int = 450  # EAS's; e.g. 429 for clients that retry on it


class ServiceHandler(Protocol):
    title: str  # the service's name in /docs
    contract: str  # the request and answer of its main route, in one line, for /docs

    def parse(self, body: Any) -> Parsed: ...  # or RequestError

    def run_batch(self, payloads: list[Any], should_stop: Callable[[], bool]) -> list[Any]: ...

    def warmup(self) -> None: ...

    def describe(self) -> dict: ...  # for /info: nothing secret, no file paths

    def routes(self) -> Sequence[ApiRoute]: ...  # other APIs over the contract

    def page(self) -> str | None: ...  # the HTML file served at GET /, if any


@dataclass
class ServiceSettings:
    max_batch_size: int = 8
    max_wait_ms: float = 50.0
    max_queue: int = 64
    request_timeout_s: float = 300.0
    api_token: str | None = None
    service_name: str = ""  # "": any name at /api/predict/<name>
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0
    retry_grace_s: float = 1.0
    auth_max_skew_s: float = 900.0
    auth_local_time: bool = True
    docs: bool = False
    # Connections (``serve``): see easynlp_ldm/serving/connections.py.
    keep_alive_s: float = 75.0
    header_timeout_s: float = 10.0
    max_connections: int = 256
    shutdown_timeout_s: float = 30.0


# ------------------------------------------------------------------------------------------------------- bodies
def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(f"an integer of {len(text)} digits; at most {MAX_INT_DIGITS} are accepted")
    return int(text)


def _no_constant(name: str):
    raise RequestError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """A request body → a JSON value, or ``RequestError`` (never a RecursionError or a 5000-digit int)."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_int=_bounded_int, parse_constant=_no_constant)
    except RecursionError:
        raise RequestError(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"malformed JSON body: {err}") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise RequestError(f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


async def read_body(request: Request, settings: ServiceSettings) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise Problem(413, f"the body is {int(declared)} bytes; at most {settings.max_body_bytes} are accepted",
                      headers={"Connection": "close"})
    chunks, size = [], 0
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > settings.max_body_bytes:
                    raise Problem(413, f"the body is over {settings.max_body_bytes} bytes", headers={"Connection":
                                                                                                    "close"})
                chunks.append(chunk)
    except TimeoutError:
        raise Problem(408, f"the body did not arrive within {settings.body_timeout_s:g} s",
                      headers={"Connection": "close"}) from None
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------------- errors
class ErrorFormat:
    """Answers other than 200 in their path's format: an app route's own under its prefix, else
    ``{"error": "<one line>", "field": …}`` (EAS's routes and every other)."""

    def __init__(self, routes: Sequence[ApiRoute]):
        self.routes = tuple(routes)

    def route(self, path: str | None) -> ApiRoute | None:
        return next((r for r in self.routes if path and path.startswith(r.prefix)), None)

    def body(self, path: str | None, status: int, message: str, field: str | None = None) -> dict:
        route = self.route(path)
        if route is not None:
            return route.error(status, message, field)
        return {"error": message} if field is None else {"error": message, "field": field}

    def answer(self, problem: Problem, path: str | None) -> JSONResponse:
        return JSONResponse(self.body(path, problem.status, str(problem), problem.field), status_code=problem.status,
                            headers=problem.headers)


INTERNAL_ERROR = "internal server error (see the service log)"
STOPPED = "the service stopped before this request finished; retry"


# ---------------------------------------------------------------------------------------------------- the app
class _Responses:
    """Pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide a client's disconnect from the routes): counts
    every answer by status, answers what ``gate`` answers before routing, and turns an unexpected exception into a
    logged 500 with a one-line body in the route's format (never a traceback to the client); a request cancelled
    because shutdown ran out of time gets a 503 in that format (uvicorn's would be a plain-text 500)."""

    def __init__(self, app, metrics: Metrics, gate: Callable[[Request], Response | None],
                 answer: Callable[[Problem, str | None], Response]):
        self.app, self.metrics, self.gate, self.answer = app, metrics, gate, answer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 0}
        early = self.gate(Request(scope))
        if early is not None:
            self.metrics.record_response(early.status_code)
            return await early(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            logger.exception("internal error answering %s %s", scope.get("method"), scope.get("path"))
            if not status["code"]:
                await self.answer(Problem(500, INTERNAL_ERROR), scope.get("path"))(scope, receive, counting_send)
            else:
                status["code"] = 500
        except asyncio.CancelledError:
            if not status["code"]:
                with contextlib.suppress(Exception):
                    await self.answer(Problem(503, STOPPED, headers={"Retry-After": "1"}), scope.get("path"))(
                        scope, receive, counting_send)
            raise
        finally:
            if status["code"]:
                self.metrics.record_response(status["code"])


def create_app(handler: ServiceHandler, settings: ServiceSettings):
    state: dict[str, Any] = {"ready": False, "batcher": None, "warmup_error": None, "stopping": False}
    metrics = Metrics()
    replays = auth.ReplayCache()
    parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="easynlp-parse")  # request bodies: see prepare
    routes = tuple(handler.routes())
    errors = ErrorFormat(routes)
    answer = errors.answer

    def start() -> None:
        try:
            handler.warmup()
            state["batcher"] = Batcher(lambda jobs, stop: handler.run_batch([job.payload for job in jobs], stop),
                                       max_batch_size=settings.max_batch_size, max_wait_ms=settings.max_wait_ms,
                                       max_queue=settings.max_queue, retry_grace_s=settings.retry_grace_s,
                                       on_batch=metrics.record_batch, on_drop=metrics.record_drop)
            state["ready"] = True
            logger.info("ready: warmed up, batching up to %d images, waiting up to %.0f ms",
                        settings.max_batch_size, settings.max_wait_ms)
        except Exception as err:  # keep answering /health with the reason
            state["warmup_error"] = type(err).__name__
            logger.exception("warm-up failed")

    def begin_shutdown() -> None:
        """Stop taking requests and answer the queued ones with 503; the running batch may finish."""
        state["stopping"], state["ready"] = True, False
        if state["batcher"] is not None:
            threading.Thread(target=state["batcher"].close, name="easynlp-drain", daemon=True).start()

    @asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=start, name="easynlp-warmup", daemon=True).start()
        yield
        begin_shutdown()
        parser.shutdown(wait=False)

    app = FastAPI(title=handler.title, lifespan=lifespan,
                  docs_url="/docs" if settings.docs else None, redoc_url=None,
                  openapi_url="/openapi.json" if settings.docs else None,
                  description=handler.contract + "".join(f"; {r.name} at {r.path}" for r in routes))
    app.state.begin_shutdown = begin_shutdown
    app.state.error_body = errors.body

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        path = request.url.path
        api = errors.route(path)
        allowed = f"POST {api.path}" if api else "POST / or /api/predict/<service>, GET /health"
        message = {404: f"no route {path}; {allowed}",
                   405: f"{request.method} is not allowed on {path}"}.get(err.status_code, str(err.detail))
        return answer(Problem(err.status_code, message, headers=getattr(err, "headers", None)), path)

    # --------------------------------------------------------------------------------------------- access
    def resource(request: Request) -> str:
        path = request.url.path
        if path.startswith("/api/predict/") or not settings.service_name:
            return path
        return f"/api/predict/{settings.service_name}"

    def check_token(request: Request, body: bytes | None = None) -> str | None:
        """Raises a 401 ``Problem`` unless the request carries the token; returns an EAS signature it claimed (to
        ``release`` when the request is not served), else None."""
        if not settings.api_token:
            return None
        given = request.headers.get("authorization", "").strip()
        signed = given.startswith("EAS ")
        if body is None and signed:
            body = b""  # a signature on a request without a body (GET)
        reason = auth.check(request.headers, body or b"", settings.api_token, resource(request),
                            max_skew_s=settings.auth_max_skew_s, allow_local_time=settings.auth_local_time)
        if not reason and signed and not replays.claim(given, auth.accepted_until(
                request.headers.get("date", ""), settings.auth_max_skew_s, settings.auth_local_time)):
            reason = "this signed request was received before (a replay); sign each request anew, as the EAS SDK does"
        if reason:
            raise Problem(401, f"authentication failed: {reason}", headers={"WWW-Authenticate": "Bearer"})
        return given if signed else None

    def guarded(route: Callable):
        """A GET route that needs the token when one is configured."""
        async def wrapper(request: Request):
            try:
                check_token(request)
            except Problem as problem:
                return answer(problem, request.url.path)
            return route()

        wrapper.__name__ = route.__name__
        return wrapper

    # ----------------------------------------------------------------------------------------- generation
    async def wait_for(request: Request, batcher: Batcher, job: Job, started: float):
        result = asyncio.wrap_future(job.future)
        result.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even when nobody waits
        deadline = started + settings.request_timeout_s
        while True:
            await asyncio.wait({result}, timeout=POLL_S)
            if result.done():
                return result.result()
            if await request.is_disconnected():
                batcher.leave(job)
                raise Problem(499, "the client went away")
            if time.monotonic() > deadline:
                batcher.leave(job)
                if not batcher.started(job):
                    raise Problem(408, f"the request waited more than {settings.request_timeout_s:g} s in the queue")
                raise Problem(504, f"the request did not finish within {settings.request_timeout_s:g} s")

    def prepare(raw: bytes, api: ApiRoute | None) -> tuple[Parsed, str]:
        """A body → its job and its share key, in the ``parser`` thread: the JSON (up to ``max_body_bytes``) and the
        handler's parse (image decoding) never hold the event loop, so /health answers meanwhile; one body at a
        time, so one request's images are decoded at once."""
        body = parse_json(raw)
        if api:
            body = api.to_contract(body)
        parsed = handler.parse(body)
        # a digest, not the body: a queued job must not keep a second copy of a request's images
        return parsed, hashlib.sha256(json.dumps(body, sort_keys=True).encode("ascii")).hexdigest()

    async def generate(request: Request, raw: bytes, api: ApiRoute | None) -> dict:
        parsed, share_key = await asyncio.get_running_loop().run_in_executor(parser, prepare, raw, api)
        batcher: Batcher = state["batcher"]
        units = min(parsed.units, settings.max_batch_size)  # a large request runs alone rather than never
        if not parsed.deterministic and batcher.waited_for(share_key):
            # The same request is under way for a client that may just have given up and sent this one (the SDK
            # retries at once): give its disconnect a poll or two to be seen, so that this request takes the work over.
            await asyncio.sleep(3 * POLL_S)
        stopping = Problem(503, "the service is shutting down; retry", headers={"Retry-After": "1"})
        try:
            job = batcher.submit(parsed.key, parsed.payload, units, share_key, parsed.deterministic)
        except QueueFull as err:
            raise Problem(api.queue_full_status if api else 450, f"queue full ({err}); retry later",
                          headers={"Retry-After": "1"}) from None
        except ShuttingDown:
            raise stopping from None
        try:
            result = await wait_for(request, batcher, job, time.monotonic())
        except ShuttingDown:
            raise stopping from None
        except Problem:
            raise
        except Exception as err:
            logger.error("request failed: %s: %s", type(err).__name__, err)
            raise Problem(500, f"generation failed: {type(err).__name__}: {err}") from None
        if api:
            return api.from_contract(result)
        return {**result, "warnings": list(parsed.warnings)} if parsed.warnings else result

    def route(api: ApiRoute | None):
        async def generation_route(request: Request):
            started, claimed, response = time.monotonic(), None, None
            try:
                if state["stopping"] or not state["ready"]:
                    reason = "shutting down" if state["stopping"] else (
                        f"warm-up failed ({state['warmup_error']})" if state["warmup_error"] else "warming up")
                    raise Problem(503, f"the service is {reason}; retry later", headers={"Retry-After": "5"})
                signed = request.headers.get("authorization", "").startswith("EAS ")
                if not signed:
                    check_token(request)  # before reading a body nobody may send
                raw = await read_body(request, settings)
                if signed:
                    claimed = check_token(request, raw)
                response = JSONResponse(await generate(request, raw, api))
            except RequestError as err:
                response = answer(Problem(400, str(err), err.field), request.url.path)
            except Problem as problem:
                response = answer(problem, request.url.path)
            except Exception:  # a fault of the service, not of the request: logged, answered in the route's format
                logger.exception("internal error answering %s %s", request.method, request.url.path)
                response = answer(Problem(500, INTERNAL_ERROR), request.url.path)
            finally:  # a signature is served once: one whose request got no images may come again
                if claimed and (response is None or response.status_code != 200):
                    replays.release(claimed)
            metrics.record(response.status_code, time.monotonic() - started)
            return response

        return generation_route

    eas = route(None)
    for path in ("/", "/predict", "/api/predict/{service_name}"):
        app.add_api_route(path, eas, methods=["POST"], summary="Generate images (the EAS contract)")
    for api in routes:
        app.add_api_route(api.path, route(api), methods=["POST"], summary=api.summary)
    def gate(request: Request) -> Response | None:
        """Before routing: another service's name at /api/predict/ is a 404; FastAPI's docs routes need the token."""
        path = request.url.path
        if settings.service_name and path.startswith("/api/predict/") and \
                path != f"/api/predict/{settings.service_name}":
            return answer(Problem(404, f"no service {path[len('/api/predict/'):]!r} here; this is "
                                       f"{settings.service_name!r}"), path)
        if path in ("/docs", "/openapi.json", "/docs/oauth2-redirect"):
            try:
                check_token(request)
            except Problem as problem:
                return answer(problem, path)
        return None

    app.add_middleware(_Responses, metrics=metrics, gate=gate, answer=answer)

    # ----------------------------------------------------------------------------------------- the rest
    @app.api_route("/health", methods=["GET", "HEAD"], include_in_schema=False)
    def health():
        """Liveness and readiness; public, so it says nothing but the state."""
        if state["ready"]:
            return {"status": "ready"}
        status = "shutting down" if state["stopping"] else "failed" if state["warmup_error"] else "warming up"
        return JSONResponse({"status": status, "error": f"not ready: {status}"}, status_code=503,
                            headers={"Retry-After": "5"})

    def info():
        limits = {name: getattr(settings, name) for name in ("max_batch_size", "max_queue", "request_timeout_s",
                                                             "max_body_bytes", "body_timeout_s")}
        described = handler.describe()
        return {**described, "limits": {**limits, **described.get("limits", {})}}

    def prometheus():
        batcher = state["batcher"]
        extra = getattr(handler, "gauges", None)  # the app's own figures (memory, caches), when it has some
        return PlainTextResponse(metrics.render(batcher.depth if batcher else 0, state["ready"])
                                 + "".join(line + "\n" for line in (extra() if extra else [])))

    app.add_api_route("/info", guarded(info), methods=["GET"], summary="The model and the limits")
    app.add_api_route("/metrics", guarded(prometheus), methods=["GET"], summary="Prometheus metrics")

    page_file = handler.page()
    if page_file:
        @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
        def page():
            """The app's web page (static; with a token it asks for it and keeps it in the browser tab's session)."""
            with open(page_file, encoding="utf-8") as handle:
                return handle.read()

    @app.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    return app


def build_server(handler: ServiceHandler, settings: ServiceSettings, host: str, port: int,
                 log_level: str | None = None):
    """The app on the hardened uvicorn server (easynlp_ldm/serving/connections.py); ``.run()`` serves it."""
    from easynlp_ldm.serving.connections import make_server

    app = create_app(handler, settings)
    return make_server(app, host=host, port=port, keep_alive_s=settings.keep_alive_s,
                       header_timeout_s=settings.header_timeout_s, limit_concurrency=settings.max_connections,
                       graceful_timeout_s=settings.shutdown_timeout_s, on_exit=app.state.begin_shutdown,
                       log_level=log_level or os.environ.get("EASYNLP_LOG_LEVEL", "info").lower(),
                       error_body=app.state.error_body)


def serve(handler: ServiceHandler, settings: ServiceSettings, host: str, port: int) -> None:
    build_server(handler, settings, host, port).run()
