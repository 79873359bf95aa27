from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.helpers import InProcessServer, png


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    running = InProcessServer(tiny_model_dir, max_batch_size=8, max_wait_ms=100)
    yield running
    running.stop()


def test_eas_contract(server):
    response = httpx.post(server.url + "/", json={"text": "测试文本", "num_inference_steps": 2, "num_images": 2},
                          timeout=60)
    assert response.status_code == 200
    body = response.json()
    assert body["text"] == "测试文本" and len(body["images_base64"]) == 2 and len(body["seeds"]) == 2
    assert all(png(b).size == (32, 32) for b in body["images_base64"])
    again = httpx.post(server.url + "/predict", json={"text": "测试文本", "num_inference_steps": 2, "num_images": 1,
                                                      "seed": body["seeds"][0]}, timeout=60).json()
    # the seed reproduces the image; alone vs in a batch of two may differ by 1/255 (matmul blocking, README "Seeds")
    alone, in_pair = (np.asarray(png(b), dtype=np.int16) for b in (again["images_base64"][0], body["images_base64"][0]))
    assert np.abs(alone - in_pair).max() <= 1


@pytest.mark.parametrize("body,field", [
    ({"num_images": 1}, "text"), ({"text": 5}, "text"), ({"text": ""}, "text"),
    ({"text": "x", "num_images": 99}, "num_images"), ({"text": "x", "num_images": "2"}, "num_images"),
    ({"text": "x", "num_inference_steps": 1000}, "num_inference_steps"),
    ({"text": "x", "width": 36}, "width"), ({"text": "x", "height": 4096}, "height"),
    ({"text": "x", "guidance_scale": "high"}, "guidance_scale"), ({"text": "x", "sampler": "magic"}, "sampler"),
    ({"text": "x", "guidance_rescale": 1.5}, "guidance_rescale"),
    ({"text": "x", "do_sr": True}, "do_sr"), ({"text": "x", "seed": -1}, "seed"),
    ({"text": "x", "num_imgs": 2}, "num_imgs"), (["text"], None)])
def test_bad_requests_are_400_naming_the_field(server, body, field):
    response = httpx.post(server.url + "/", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json().get("field") == field


def test_guidance_rescale_request_field_changes_the_image(server):
    def image(**fields):
        body = {"text": "测试文本", "num_inference_steps": 3, "guidance_scale": 9, "seed": 11, **fields}
        response = httpx.post(server.url + "/", json=body, timeout=60)
        assert response.status_code == 200
        return np.asarray(png(response.json()["images_base64"][0]), dtype=np.int16)

    assert np.abs(image(guidance_rescale=0.7) - image()).max() > 3
    assert np.abs(image(guidance_rescale=0) - image()).max() <= 1


def test_malformed_json_wrong_method_unknown_path(server):
    assert httpx.post(server.url + "/", content=b"{not json", timeout=30).status_code == 400
    assert httpx.get(server.url + "/predict", timeout=30).status_code == 405
    assert httpx.get(server.url + "/nowhere", timeout=30).status_code == 404


def test_64_requests_from_8_clients_batched(server):
    def one(i):
        r = httpx.post(server.url + "/", json={"text": f"红色的圆形 {i % 3}", "num_inference_steps": 2,
                                                "num_images": 1}, timeout=120)
        return r.status_code, r.json()

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(64)))
    assert all(status == 200 for status, _ in results)
    assert all(png(body["images_base64"][0]) for _, body in results)
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ready"
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'easynlp_requests_total{status="200"}' in metrics and "easynlp_queue_depth" in metrics
    buckets = {line.split('"')[1]: int(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("easynlp_batch_size_images_bucket")}
    assert buckets["1"] < buckets["+Inf"]  # some model calls served several requests at once


def test_web_page_and_docs(server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "生成" in page.text and "<textarea" in page.text
    assert httpx.get(server.url + "/openapi.json", timeout=10).status_code == 200


def test_one_failing_request_does_not_affect_others(server, monkeypatch):
    original = server.service._run

    def flaky(payloads):
        if any(p["text"] == "炸" for p in payloads):
            raise RuntimeError("boom")
        return original(payloads)

    monkeypatch.setattr(server.service, "_run", flaky)

    def one(text):
        return httpx.post(server.url + "/", json={"text": text, "num_inference_steps": 2}, timeout=60).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, ["好", "炸", "好", "好"]))
    assert statuses.count(200) == 3 and statuses.count(500) == 1
    assert one("好") == 200


def test_queue_full_429_and_timeout(tiny_model_dir):
    running = InProcessServer(tiny_model_dir, max_batch_size=1, max_wait_ms=0, max_queue=1, request_timeout=1.0)
    try:
        def slow(_):
            r = httpx.post(running.url + "/", json={"text": "慢", "num_inference_steps": 40}, timeout=60)
            return r.status_code, r.headers.get("retry-after")

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(slow, range(6)))
        statuses = [s for s, _ in results]
        assert 429 in statuses and all(h == "1" for s, h in results if s == 429)
        assert set(statuses) & {408, 504}
    finally:
        running.stop()


def test_bearer_token(tiny_model_dir):
    running = InProcessServer(tiny_model_dir, api_token="s3cret")
    try:
        body = {"text": "测试", "num_inference_steps": 2}
        assert httpx.post(running.url + "/", json=body, timeout=30).status_code == 401
        assert httpx.post(running.url + "/", json=body, timeout=30,
                          headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(running.url + "/", json=body, timeout=30,
                          headers={"Authorization": "Bearer s3cret"}).status_code == 200
    finally:
        running.stop()


def test_fields_left_out_take_the_services_parameters(tiny_model_dir):
    running = InProcessServer(tiny_model_dir, H=64, W=64, ddim_steps=2)
    try:
        response = httpx.post(running.url + "/", json={"text": "测试文本", "seed": 1}, timeout=60)
        assert response.status_code == 200 and png(response.json()["images_base64"][0]).size == (64, 64)
        response = httpx.post(running.url + "/", json={"text": "测试文本", "width": 32, "height": 32}, timeout=60)
        assert png(response.json()["images_base64"][0]).size == (32, 32)
    finally:
        running.stop()
