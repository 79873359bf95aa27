"""The uvicorn server the service runs on, hardened for real traffic.

- Header read timeout: a connection must deliver complete request headers within ``header_timeout_s`` of opening,
  or of the first bytes of its next request, else it gets a 408 and is closed (slowloris cannot hold sockets open).
- ``limit_concurrency``: beyond that many connections/tasks uvicorn answers 503 instead of queueing without bound.
- Bounded graceful shutdown: ``on_exit`` runs once, first (the app rejects queued and new work), then in-flight
  requests get ``graceful_timeout_s`` to finish before they are cancelled and the process exits.
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


class HeaderTimeoutProtocol(H11Protocol):
    """H11Protocol that bounds the time between a request's first byte (or connection open) and its full headers."""

    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None

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
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the h11.Request event arrived (or the connection failed)
            self._cancel_header_timer()

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
            body = json.dumps({"error": f"request headers not received within {self.header_timeout_s:g} s"}).encode()
            head = (
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            )
            self.transport.write(head + body)
        self.transport.close()


class HardenedServer(uvicorn.Server):
    """uvicorn.Server that calls ``on_exit`` exactly once, bounded, before waiting for open connections."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None] | None) -> None:
        super().__init__(config)
        self._on_exit, self._on_exit_called = on_exit, False

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._on_exit is not None and not self._on_exit_called:
            self._on_exit_called = True
            await self._run_on_exit(self._on_exit)
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
) -> uvicorn.Server:
    """A configured server; ``.run()`` serves ``app`` until SIGTERM/SIGINT or ``server.should_exit = True``."""
    protocol = type("HeaderTimeoutH11Protocol", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s})
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
