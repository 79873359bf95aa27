import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from fastapi import FastAPI

from easynlp_ldm.serving.connections import make_server

HEADER_TIMEOUT_S = 0.5


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/")
    async def root() -> dict:
        return {"ok": True}

    @app.get("/slow")
    async def slow(seconds: float) -> dict:
        await asyncio.sleep(seconds)
        return {"slept": seconds}

    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, **kwargs: object) -> None:
        self.port = _free_port()
        self.exits: list[float] = []
        self.server = make_server(
            _app(),
            host="127.0.0.1",
            port=self.port,
            on_exit=lambda: self.exits.append(time.monotonic()),
            log_level="warning",
            **kwargs,  # type: ignore[arg-type]
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return sock

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def running() -> Iterator[Running]:
    r = Running(header_timeout_s=HEADER_TIMEOUT_S, graceful_timeout_s=1)
    yield r
    r.stop()


def _read_response(sock: socket.socket) -> tuple[int, dict, bytes]:
    """Read one response with a content-length body; returns (status, headers, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        assert chunk, f"closed before a full response: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(4096)
        assert chunk
        body += chunk
    return int(lines[0].split()[1]), headers, body


def _read_until_closed(sock: socket.socket) -> bytes:
    buf = b""
    while chunk := sock.recv(4096):
        buf += chunk
    return buf


def _get(running: Running, path: str) -> tuple[int, bytes]:
    with running.connect() as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, _, body = _read_response(sock)
        return status, body


def test_incomplete_headers_get_408_and_close_while_others_are_served(running: Running) -> None:
    slow = running.connect()
    start = time.monotonic()
    slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert _get(running, "/") == (200, b'{"ok":true}')  # another connection is unaffected meanwhile

    reply = _read_until_closed(slow)
    elapsed = time.monotonic() - start
    slow.close()
    assert HEADER_TIMEOUT_S - 0.1 <= elapsed < HEADER_TIMEOUT_S + 1
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b"connection: close" in head.lower()
    assert json.loads(body) == {"error": "request headers not received within 0.5 s"}


def test_silent_connection_is_closed_too(running: Running) -> None:
    with running.connect() as sock:
        start = time.monotonic()
        assert _read_until_closed(sock).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 1


def test_partial_second_request_on_kept_alive_connection_is_closed(running: Running) -> None:
    with running.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = _read_response(sock)
        assert (status, body) == (200, b'{"ok":true}')
        assert headers.get("connection") != "close"

        time.sleep(HEADER_TIMEOUT_S + 0.2)  # idle kept-alive time is keep-alive's business, not the header timeout's
        start = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHo")
        reply = _read_until_closed(sock)
        assert time.monotonic() - start < HEADER_TIMEOUT_S + 1
        assert reply.startswith(b"HTTP/1.1 408")


def test_request_sent_slowly_within_the_timeout_succeeds(running: Running) -> None:
    with running.connect() as sock:
        for _ in range(2):  # on a fresh connection, then again on the kept-alive one
            sock.sendall(b"GET / HTTP/1.1\r\n")
            time.sleep(HEADER_TIMEOUT_S / 2)
            sock.sendall(b"Host: x\r\n\r\n")
            status, _, body = _read_response(sock)
            assert (status, body) == (200, b'{"ok":true}')
            time.sleep(HEADER_TIMEOUT_S / 2)  # the header timer does not outlive the request it guarded
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(sock)[0] == 200


def test_shutdown_calls_on_exit_once_and_is_bounded_by_the_graceful_timeout(running: Running) -> None:
    with running.connect() as sock:
        sock.sendall(b"GET /slow?seconds=30 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)
        start = time.monotonic()
        running.server.should_exit = True
        running.thread.join(5)
        assert not running.thread.is_alive()
        assert time.monotonic() - start < 3
        assert len(running.exits) == 1 and running.exits[0] >= start


def test_in_flight_request_finishes_during_graceful_shutdown() -> None:
    running = Running(header_timeout_s=HEADER_TIMEOUT_S, graceful_timeout_s=10)
    result: list[tuple[int, bytes]] = []
    client = threading.Thread(target=lambda: result.append(_get(running, "/slow?seconds=0.5")))
    client.start()
    time.sleep(0.2)
    running.stop()
    client.join(5)
    assert not running.thread.is_alive()
    assert result == [(200, b'{"slept":0.5}')]
    assert len(running.exits) == 1


def test_failing_on_exit_does_not_prevent_shutdown() -> None:
    port = _free_port()

    def boom() -> None:
        raise RuntimeError("boom")

    server = make_server(_app(), host="127.0.0.1", port=port, on_exit=boom, graceful_timeout_s=1, log_level="critical")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    server.should_exit = True
    thread.join(5)
    assert not thread.is_alive()


def test_while_in_flight_work_drains_the_server_still_answers_new_connections() -> None:
    """A load balancer's readiness probe must see the app's own 'shutting down' answer (``on_exit`` has told the app),
    not a refused connection; once the work is done the socket closes."""
    running = Running(header_timeout_s=HEADER_TIMEOUT_S, graceful_timeout_s=10)
    result: list[tuple[int, bytes]] = []
    client = threading.Thread(target=lambda: result.append(_get(running, "/slow?seconds=1.5")))
    client.start()
    time.sleep(0.2)
    start = time.monotonic()
    stopper = threading.Thread(target=running.stop)
    stopper.start()
    time.sleep(0.3)
    assert len(running.exits) == 1  # the app was told first
    assert _get(running, "/") == (200, b'{"ok":true}')  # a new connection during the drain is answered
    client.join(5)
    stopper.join(5)
    assert result == [(200, b'{"slept":1.5}')] and not running.thread.is_alive()
    assert time.monotonic() - start < 3
    with pytest.raises(OSError):
        running.connect()
