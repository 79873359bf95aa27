"""Every answer of every route in that route's own error format, through a real server: the EAS routes (and every
other route but OpenAI's) answer ``{"error": "<one line>", "field": …}``; ``/v1/…`` answers OpenAI's error object
``{"error": {"message", "type", "param", "code"}}``, read here by the ``openai`` package itself where it applies."""

import json
import socket
import threading
import time

import httpx
import pytest

from tests.helpers import InProcessServer

TOKEN = "s3cret"
AUTH = {"Authorization": TOKEN}
LONG = {"text": "蓝色的正方形", "num_inference_steps": 2000}


@pytest.fixture(scope="module")
def strict(tiny_model_dir):
    """Small limits, so each refusal is cheap to provoke: at most 3 connections served at once, one queued request,
    one image per model call, bodies of 4 KB arriving within 0.5 s."""
    running = InProcessServer(tiny_model_dir, api_token=TOKEN, max_connections=4, max_queue=1, max_batch_size=1,
                              max_wait_ms=0, max_steps=2000, max_request_work=10**6, header_timeout=0.5,
                              body_timeout=0.5, max_body_bytes=4096, retry_grace=0.1)
    yield running
    running.stop()


def is_eas(response, status):
    body = response.json()
    assert response.status_code == status, response.text
    assert set(body) <= {"error", "field"} and isinstance(body["error"], str) and "\n" not in body["error"], body
    return body


def openai_error(status, body):
    """OpenAI's error object (what its API answers and its client parses into ``APIStatusError``)."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    assert error["type"] == ("server_error" if status >= 500 else error["type"]) and isinstance(error["type"], str)
    return error


def is_openai(response, status):
    assert response.status_code == status, response.text
    return openai_error(status, response.json())


def openai_call(server, call, key=TOKEN):
    """``call(client)`` with the ``openai`` package's client, closed after (its connections count against
    max_connections)."""
    from openai import OpenAI

    with OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30) as client:
        return call(client)


def raw_exchange(server, data: bytes, wait: float = 5) -> tuple[int, dict]:
    """Send ``data`` on a fresh connection, read until the server closes it: (status, JSON body)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def surrogate_body(**fields) -> bytes:
    return json.dumps(fields).encode()  # ASCII-escaped: "\ud800" is legal JSON, a lone UTF-16 surrogate


def test_eas_routes_answer_every_error_in_the_eas_format(strict):
    url = strict.url
    is_eas(httpx.post(url + "/", json={"text": "x"}, timeout=30), 401)
    is_eas(httpx.get(url + "/info", timeout=30), 401)
    is_eas(httpx.get(url + "/metrics", headers={"Authorization": "Bearer wrong"}, timeout=30), 401)
    assert is_eas(httpx.post(url + "/api/predict/t2i", json={"text": "x", "num_images": 99}, headers=AUTH,
                             timeout=30), 400)["field"] == "num_images"
    is_eas(httpx.get(url + "/predict", headers=AUTH, timeout=30), 405)
    is_eas(httpx.get(url + "/nowhere", headers=AUTH, timeout=30), 404)
    is_eas(httpx.post(url + "/", json={"text": "x" * 5000}, headers=AUTH, timeout=30), 413)
    # a lone surrogate is legal JSON: whatever the service makes of it, the answer is in the route's format
    response = httpx.post(url + "/", content=surrogate_body(text="\ud800 red", num_inference_steps=1), headers=AUTH,
                          timeout=30)
    assert response.status_code != 200 and is_eas(response, response.status_code)
    # answered before the app runs: the body and header timeouts, a request that is not HTTP
    body_late = b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: s3cret\r\nContent-Length: 100\r\n\r\n{"
    status, body = raw_exchange(strict, body_late)
    assert status == 408 and set(body) == {"error"}
    status, body = raw_exchange(strict, b"POST /predict HTTP/1.1\r\nHost: x\r\n")
    assert status == 408 and set(body) == {"error"}
    status, body = raw_exchange(strict, b"NOT HTTP AT ALL\r\n\r\n")
    assert status == 400 and set(body) == {"error"}


def test_openai_route_answers_every_error_in_openais_shape(strict):
    from openai import APIStatusError, AuthenticationError, BadRequestError, NotFoundError

    with pytest.raises(AuthenticationError) as refused:
        openai_call(strict, lambda c: c.images.generate(prompt="圆"), "wrong")
    assert openai_error(401, {"error": refused.value.body})["type"] == "authentication_error"
    with pytest.raises(BadRequestError) as bad:
        openai_call(strict, lambda c: c.images.generate(prompt="圆", n=99))
    assert bad.value.param == "n" and openai_error(400, {"error": bad.value.body})
    with pytest.raises(APIStatusError) as large:
        openai_call(strict, lambda c: c.images.generate(prompt="圆" * 5000))
    assert large.value.status_code == 413 and openai_error(413, {"error": large.value.body})
    with pytest.raises(NotFoundError) as missing:  # a route this service does not have
        openai_call(strict, lambda c: c.models.list())
    assert openai_error(404, {"error": missing.value.body})
    url = strict.url + "/v1/images/generations"
    is_openai(httpx.get(url, headers=AUTH, timeout=30), 405)
    response = httpx.post(url, content=surrogate_body(prompt="\ud800 red"), headers=AUTH, timeout=30)
    assert response.status_code != 200 and is_openai(response, response.status_code)
    body_late = b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nAuthorization: s3cret\r\nContent-Length: 9\r\n\r\n"
    status, body = raw_exchange(strict, body_late)
    assert status == 408 and openai_error(408, body)
    status, body = raw_exchange(strict, b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
    assert status == 408 and openai_error(408, body)
    status, body = raw_exchange(strict, b"POST /v1/images/generations HTTP/1.1\r\nHost x\r\n\r\n")  # no colon
    assert status == 400 and openai_error(400, body)


def test_the_connection_limit_answers_in_the_routes_format(strict):
    from openai import InternalServerError

    idle = [socket.create_connection(("127.0.0.1", strict.port)) for _ in range(3)]  # max_connections=4 counts
    try:  # the new one too
        time.sleep(0.2)
        eas = httpx.post(strict.url + "/", json={"text": "x"}, headers=AUTH, timeout=30)
        assert is_eas(eas, 503) and eas.headers.get("retry-after")
        with pytest.raises(InternalServerError) as overloaded:
            openai_call(strict, lambda c: c.images.generate(prompt="圆"))
        assert overloaded.value.status_code == 503 and openai_error(503, {"error": overloaded.value.body})
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(strict.url + "/health", timeout=10).status_code == 200


def test_queue_full_is_450_on_eas_and_429_on_openai_as_the_help_says(strict):
    from openai import RateLimitError

    from appzoo.latent_diffusion.params import PARAMS

    def hold():  # one request runs, the next waits in the queue (max_queue=1); both are abandoned after 2 s
        try:
            httpx.post(strict.url + "/", json=LONG, headers=AUTH, timeout=2.0)
        except httpx.TimeoutException:
            pass

    holders = [threading.Thread(target=hold) for _ in range(2)]
    for thread in holders:
        thread.start()
        time.sleep(0.4)
    try:
        eas = httpx.post(strict.url + "/", json={"text": "x", "num_inference_steps": 1}, headers=AUTH, timeout=30)
        assert "queue full" in is_eas(eas, 450)["error"] and eas.headers["retry-after"]
        with pytest.raises(RateLimitError) as full:
            openai_call(strict, lambda c: c.images.generate(prompt="圆", extra_body={"num_inference_steps": 1}))
        assert openai_error(429, {"error": full.value.body})["type"] == "rate_limit_error"
    finally:
        for thread in holders:
            thread.join(30)
    help_text = next(p.help for p in PARAMS if p.name == "max_queue")
    assert "450" in help_text and "429" in help_text


def test_an_unexpected_exception_in_the_service_is_a_500_in_the_routes_format(strict, monkeypatch):
    from openai import InternalServerError

    def broken(body):
        raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")

    def failed_requests():
        metrics = httpx.get(strict.url + "/metrics", headers=AUTH, timeout=30).text
        return sum(int(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith('easynlp_requests_total{status="500"}'))

    before = failed_requests()
    monkeypatch.setattr(strict.service, "parse", broken)
    eas = httpx.post(strict.url + "/", json={"text": "x"}, headers=AUTH, timeout=30)
    assert "TextEncodeInput" not in is_eas(eas, 500)["error"]  # the log has it; the client gets one line
    with pytest.raises(InternalServerError) as failed:
        openai_call(strict, lambda c: c.images.generate(prompt="圆"))
    assert failed.value.status_code == 500 and openai_error(500, {"error": failed.value.body})
    monkeypatch.setattr(strict.service, "describe", lambda: 1 / 0)
    is_eas(httpx.get(strict.url + "/info", headers=AUTH, timeout=30), 500)
    assert failed_requests() - before == 2  # the generation requests are counted as such
