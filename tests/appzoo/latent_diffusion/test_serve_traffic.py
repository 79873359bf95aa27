"""The service under real traffic: clients that go away, deadlines, retries of the same request, shutdown."""

import re
import threading
import time

import httpx
import pytest

from tests.helpers import InProcessServer

# 4 images × 2000 steps on the tiny model: about a minute and a half of work if nobody stopped it.
HEAVY = {"text": "蓝色的正方形", "num_inference_steps": 2000, "num_images": 4}
LIGHT = {"text": "红色的圆形", "num_inference_steps": 2, "seed": 3}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    running = InProcessServer(tiny_model_dir, max_steps=2000, max_request_work=10**6, max_batch_size=4,
                              retry_grace=0.5)
    yield running
    running.stop()


def dropped(server):
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {m[0]: int(m[1]) for m in re.findall(r'easynlp_dropped_images_total\{stage="(\w+)"\} (\d+)', text)}


def abandon(server, body, after=0.3):
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/", json=body, timeout=after)


def latency(server, body=LIGHT):
    start = time.monotonic()
    response = httpx.post(server.url + "/", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return time.monotonic() - start


def test_a_request_whose_client_went_away_stops_and_does_not_delay_the_next(server):
    alone = min(latency(server) for _ in range(3))
    before = dropped(server)
    abandon(server, HEAVY)
    # the next request waits at most for the abandoned batch's current step (4 images) and the disconnect check
    assert latency(server) < alone + 1.0
    after = dropped(server)
    assert after["running"] - before["running"] == 4


def test_a_request_past_its_deadline_is_answered_and_its_work_stopped(tiny_model_dir):
    server = InProcessServer(tiny_model_dir, max_steps=2000, max_request_work=10**6, max_batch_size=4,
                             request_timeout=2.0, retry_grace=0.5)
    try:
        start = time.monotonic()
        response = httpx.post(server.url + "/", json=HEAVY, timeout=60)
        assert response.status_code == 504 and time.monotonic() - start < 2.0 + 1.0
        assert "2 s" in response.json()["error"]
        deadline = time.monotonic() + 10
        while dropped(server)["running"] < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dropped(server)["running"] == 4
        assert latency(server) < 2.0
    finally:
        server.stop()


def test_an_identical_retry_takes_over_the_work_under_way(server):
    """The EAS SDK gives up after 5 s and sends the same request again: the retry gets the images already being
    generated (no seed needed: the first client is gone), not a second generation."""
    body = {"text": "黄色的三角形", "num_inference_steps": 150, "num_images": 1}
    before = dropped(server)
    abandon(server, body)
    response = httpx.post(server.url + "/", json=body, timeout=60)
    assert response.status_code == 200 and len(response.json()["images_base64"]) == 1
    after = dropped(server)
    assert after["shared"] - before["shared"] == 1 and after["running"] == before["running"]


def test_identical_seeded_requests_share_one_generation(server):
    body = {"text": "紫色的圆形", "num_inference_steps": 100, "num_images": 2, "seed": 9}
    before = dropped(server)
    results = []
    threads = [threading.Thread(target=lambda: results.append(httpx.post(server.url + "/", json=body, timeout=60)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join()
    assert [r.status_code for r in results] == [200] * 3
    assert len({tuple(r.json()["images_base64"]) for r in results}) == 1
    assert dropped(server)["shared"] - before["shared"] == 4  # two requests of 2 images joined the first


def test_shutdown_answers_queued_requests_at_once_and_lets_running_work_finish(tiny_model_dir):
    running = InProcessServer(tiny_model_dir, max_steps=400, max_request_work=10**6, max_batch_size=1,
                              max_wait_ms=0, shutdown_timeout=20.0)
    results = {}

    def send(name, body):
        results[name] = httpx.post(running.url + "/", json=body, timeout=60)

    threads = [threading.Thread(target=send, args=("running", {**HEAVY, "num_inference_steps": 150,
                                                               "num_images": 1}))]
    threads[0].start()
    time.sleep(0.5)
    threads += [threading.Thread(target=send, args=(f"queued{i}", {**LIGHT, "seed": i})) for i in range(2)]
    for thread in threads[1:]:
        thread.start()
    time.sleep(0.3)
    start = time.monotonic()
    stopper = threading.Thread(target=running.stop)
    stopper.start()
    for thread in threads[1:]:
        thread.join(10)
    assert time.monotonic() - start < 3.0
    assert [results[f"queued{i}"].status_code for i in range(2)] == [503, 503]
    assert results["queued0"].headers["retry-after"] == "1"
    threads[0].join(30)
    stopper.join(30)
    assert results["running"].status_code == 200
