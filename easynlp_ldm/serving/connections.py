"""The uvicorn server the service runs on, hardened for real traffic.

- Header read timeout: a connection must deliver complete request headers within ``header_timeout_s`` of opening,
  or of the first bytes of its next request, else it gets a 408 and is closed (slowloris cannot hold sockets open).
- ``limit_concurrency``: beyond that many connections/tasks the server answers 503 instead of queueing without bound.
- Every answer the server gives itself (that 503, the header timeout's 408, the 400 for bytes that are not HTTP) has
  the body ``error_body(path, status, message)`` gives: the app's own error format for that path.
- Bounded graceful shutdown: ``on_exit`` runs once, first (the app rejects queued and new work), then in-flight
  requests get ``graceful_timeout_s`` to finish before they are cancelled and the process exits. While they run the
  socket stays open and new requests reach the app (which answers them 503 "shutting down": what a load
  balancer's readiness probe needs to see); it closes once nothing is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)

ErrorBody = Callable[[str | None, int, str], dict]  # (path or None, status, one-line message) → the JSON body

DRAIN_POLL_S = 0.05
HEAD_BYTES = 512  # of a request's head kept until it has arrived whole (for its path)


def plain_error(path: str | None, status: int, message: str) -> dict:
    return {"error": message}


def _request_path(head: bytes) -> str | None:
    """The path of a request line (``POST /v1/images/generations?x HTTP/1.1``), or None."""
    words = head.split(b"\r\n", 1)[0].split(b" ")
    return words[1].split(b"?", 1)[0].decode("latin-1") if len(words) >= 2 and words[1].startswith(b"/") else None


class HeaderTimeoutProtocol(H11Protocol):
    """H11Protocol that bounds the time between a request's first byte (or connection open) and its full headers,
    applies the concurrency limit itself and answers its own errors with ``error_body``."""

    header_timeout_s: float = 10.0
    error_body: ErrorBody = staticmethod(plain_error)
    _header_timer: asyncio.TimerHandle | None = None
    _head = b""  # the first bytes of the request whose head is arriving: its path, for an error answered before it

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own check answers a plain-text 503: the same check here, before the app, answers in its format.
        self.max_concurrency, self.limit_concurrency = self.limit_concurrency, None
        app = self.app

        async def admitted(scope, receive, send) -> None:
            limit = self.max_concurrency  # the running task is already counted in self.tasks
            if limit is not None and (len(self.connections) >= limit or len(self.tasks) > limit):
                self.logger.warning("Exceeded concurrency limit.")
                message = f"the service is at its limit of {limit} connections at once (max_connections); retry"
                await self._send_json(send, 503, scope.get("path"), message, retry_after=True)
                return
            await app(scope, receive, send)

        self.app = admitted

    async def _send_json(self, send, status: int, path: str | None, message: str, retry_after: bool = False) -> None:
        body = json.dumps(self.error_body(path, status, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")] + ([(b"retry-after", b"1")] if retry_after else [])
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _raw_json(self, status: int, reason: bytes, message: str) -> bytes:
        """A whole response, written outside a request cycle (the request's head never arrived whole)."""
        path = _request_path(self._head or self.conn.trailing_data[0])
        body = json.dumps(self.error_body(path, status, message)).encode()
        return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close"
                b"\r\n\r\n" % (status, reason, len(body))) + body

    def send_400_response(self, msg: str) -> None:
        if self.conn.our_state is h11.IDLE or self.conn.our_state is h11.SEND_RESPONSE:
            self.transport.write(self._raw_json(400, b"Bad Request", "not a valid HTTP/1.1 request"))
        self.transport.close()

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # bytes of a (next) request: the keep-alive timer stops, ours starts
            self._arm_header_timer()
            if len(self._head) < HEAD_BYTES:
                self._head += data[:HEAD_BYTES - len(self._head)]
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the h11.Request event arrived (or the connection failed)
            self._cancel_header_timer()
            self._head = b""

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined next request that is only partly buffered must be bounded too.
        if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0] and not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.our_state is h11.IDLE:  # nothing sent for this request yet: say why we hang up
            self.transport.write(self._raw_json(408, b"Request Timeout", "request headers not received within "
                                                f"{self.header_timeout_s:g} s"))
        self.transport.close()


class HardenedServer(uvicorn.Server):
    """uvicorn.Server that calls ``on_exit`` exactly once, bounded, before waiting for open connections."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_exit, self._on_exit_called = on_exit, False

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        bound = self.config.timeout_graceful_shutdown
        deadline = None if bound is None else loop.time() + bound
        if self._on_exit is not None and not self._on_exit_called:
            self._on_exit_called = True
            await self._run_on_exit(self._on_exit)
        # Drain: the socket stays open while requests are in flight, so that new connections (a load balancer's
        # readiness probe, clients that have not noticed yet) get the app's answer (503 "shutting down"), not a
        # refused connection. uvicorn's own shutdown then closes the socket and waits for what remains, within what
        # is left of the same bound.
        while self.server_state.tasks and not self.force_exit and (deadline is None or loop.time() < deadline):
            await asyncio.sleep(DRAIN_POLL_S)
        if deadline is not None:
            self.config.timeout_graceful_shutdown = max(deadline - loop.time(), DRAIN_POLL_S)
        await super().shutdown(sockets)

    async def _run_on_exit(self, on_exit: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def target() -> None:  # a daemon thread, so a hung on_exit cannot keep the process alive
            try:
                on_exit()
            except Exception:
                logger.exception("on_exit failed; shutting down anyway")
            finally:
                with contextlib.suppress(RuntimeError):  # the loop may be closed already
                    loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        threading.Thread(target=target, name="server-on-exit", daemon=True).start()
        bound = self.config.timeout_graceful_shutdown  # on_exit gets its own bound, as long as the in-flight work's
        try:
            await asyncio.wait_for(asyncio.shield(done), bound)
        except asyncio.TimeoutError:
            logger.warning("on_exit still running after %s s; shutting down anyway", bound)


def make_server(
    app: Any,
    *,
    host: str,
    port: int,
    keep_alive_s: float = 75,
    header_timeout_s: float = 10.0,
    limit_concurrency: int | None = 256,
    graceful_timeout_s: float = 30.0,
    on_exit: Callable[[], None] | None = None,
    log_level: str = "info",
    error_body: ErrorBody = plain_error,
) -> uvicorn.Server:
    """A configured server; ``.run()`` serves ``app`` until SIGTERM/SIGINT or ``server.should_exit = True``."""
    protocol = type("HeaderTimeoutH11Protocol", (HeaderTimeoutProtocol,),
                    {"header_timeout_s": header_timeout_s, "error_body": staticmethod(error_body)})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        limit_concurrency=limit_concurrency,
        log_level=log_level,
        timeout_keep_alive=keep_alive_s,
        timeout_graceful_shutdown=graceful_timeout_s,  # type: ignore[arg-type]
        server_header=False,
    )
    return HardenedServer(config, on_exit)
