import base64
import dataclasses
import email.utils
import hashlib
import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch

from appzoo.latent_diffusion.conditioning import ImageInputs, fit
from appzoo.latent_diffusion.generation import Generator
from appzoo.latent_diffusion.serve import MAX_GENERATORS
from easynlp_ldm.tables import encode_image_base64
from tests.helpers import InProcessServer, aigc_fields, make_test_controlnet, mask, photo, png, shows_visible_label


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


def test_both_routes_return_images_with_the_aigc_label_and_the_visible_one_on_request(server):
    eas = httpx.post(server.url + "/", json={"text": "测试文本", "num_inference_steps": 2, "num_images": 2, "seed": 3},
                     timeout=60).json()["images_base64"]
    openai = httpx.post(server.url + "/v1/images/generations", json={"prompt": "测试文本", "n": 2,
                                                                     "num_inference_steps": 2, "seed": 3},
                        timeout=60).json()["data"]
    images = eas + [item["b64_json"] for item in openai]
    fields = [aigc_fields(base64.b64decode(image)) for image in images]
    assert all(f["Label"] == "1" and f["ContentProducer"].startswith("easynlp-ldm@") for f in fields)
    assert len({f["ProduceID"] for f in fields}) == 4
    assert not any(shows_visible_label(png(image)) for image in images)
    shown = httpx.post(server.url + "/", json={"text": "测试文本", "num_inference_steps": 2, "seed": 3,
                                               "aigc_visible_label": True}, timeout=60).json()["images_base64"][0]
    assert shows_visible_label(png(shown)) and aigc_fields(base64.b64decode(shown))["Label"] == "1"
    bad = httpx.post(server.url + "/", json={"text": "x", "aigc_visible_label": "yes"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["field"] == "aigc_visible_label"


@pytest.mark.parametrize("body,field", [
    ({"num_images": 1}, "text"), ({"text": 5}, "text"), ({"text": ""}, "text"),
    ({"text": "x", "num_images": 99}, "num_images"), ({"text": "x", "num_images": "2"}, "num_images"),
    ({"text": "x", "num_inference_steps": 1000}, "num_inference_steps"),
    ({"text": "x", "width": 36}, "width"), ({"text": "x", "height": 4096}, "height"),
    ({"text": "x", "guidance_scale": "high"}, "guidance_scale"), ({"text": "x", "sampler": "magic"}, "sampler"),
    ({"text": "x", "guidance_rescale": 1.5}, "guidance_rescale"),
    ({"text": "x", "do_sr": True}, "do_sr"), ({"text": "x", "seed": -1}, "seed"),
    ({"text": "x", "num_imgs": 2}, "num_imgs"), (["text"], None),
    # limits: text length, size relative to the native 32² (max 2×), images × steps × pixels (max 400 native steps)
    ({"text": "字" * 1001}, "text"), ({"text": "x", "width": 96}, "width"),
    ({"text": "x", "num_images": 4, "num_inference_steps": 40, "width": 64, "height": 64}, "num_images")])
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


@pytest.mark.parametrize("raw", [b"{not json", b"[" * 100_000, b'{"text": "x", "seed": ' + b"9" * 5000 + b"}",
                                 b'{"text": "x", "guidance_scale": NaN}', b'{"text": "x", "seed": 1' + b"0" * 30 + b"}",
                                 b"\xff\xfe", b'{"text": ' + b"[" * 40 + b"]" * 40 + b"}"])
def test_any_malformed_body_is_a_400_with_one_line(server, raw):
    response = httpx.post(server.url + "/", content=raw, timeout=30)
    assert response.status_code == 400 and "\n" not in response.json()["error"]


def test_every_error_has_the_same_json_shape_and_is_counted(server):
    for method, path, status in (("GET", "/predict", 405), ("GET", "/nowhere", 404), ("PUT", "/", 405),
                                 ("GET", "/openapi.json", 404), ("GET", "/docs", 404)):
        response = httpx.request(method, server.url + path, timeout=30)
        assert response.status_code == status and set(response.json()) == {"error"}, (method, path)
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'easynlp_responses_total{status="404"}' in metrics and 'easynlp_responses_total{status="405"}' in metrics


def test_body_size_limit_refuses_fast_without_reading_it(server):
    def rss():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    chunk = b"x" * 65536
    before = rss()
    start = time.monotonic()
    declared = httpx.post(server.url + "/", content=iter([chunk] * 800), timeout=30,
                          headers={"Content-Length": str(800 * len(chunk))})  # 50 MB announced
    streamed = httpx.post(server.url + "/", content=iter([chunk] * 800), timeout=30)  # 50 MB, chunked
    assert declared.status_code == 413 and streamed.status_code == 413
    assert time.monotonic() - start < 2.0  # both
    assert rss() - before < 100 * 2**20
    assert httpx.post(server.url + "/", json={"text": "测试", "num_inference_steps": 1}, timeout=30).status_code == 200


def test_text_past_the_models_context_is_answered_with_a_warning(server):
    response = httpx.post(server.url + "/", json={"text": "红色的圆形" * 20, "num_inference_steps": 1}, timeout=30)
    assert response.status_code == 200
    assert "the model reads the first" in response.json()["warnings"][0]
    assert "warnings" not in httpx.post(server.url + "/", json={"text": "红色的圆形", "num_inference_steps": 1},
                                        timeout=30).json()


def test_seeds_handed_out_stay_below_2_53_and_old_large_seeds_still_work(server):
    seeds = [httpx.post(server.url + "/", json={"text": "圆", "num_inference_steps": 1, "num_images": 4},
                        timeout=30).json()["seeds"] for _ in range(5)]
    assert all(0 <= seed < 2**53 for group in seeds for seed in group)
    old = httpx.post(server.url + "/", json={"text": "圆", "num_inference_steps": 1, "seed": 2**62 + 5}, timeout=30)
    assert old.status_code == 200 and old.json()["seeds"] == [2**62 + 5]


def test_generators_for_distinct_settings_are_bounded(server):
    for i in range(MAX_GENERATORS + 4):
        body = {"text": "圆", "num_inference_steps": 1, "guidance_scale": 1 + i / 10}
        assert httpx.post(server.url + "/", json=body, timeout=30).status_code == 200
    assert len(server.service.generators) == MAX_GENERATORS


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


def test_web_page_head_and_favicon(server):
    page = httpx.get(server.url + "/", timeout=10)
    assert page.status_code == 200 and "生成" in page.text and "<textarea" in page.text
    assert httpx.head(server.url + "/", timeout=10).status_code == 200
    assert httpx.head(server.url + "/health", timeout=10).status_code == 200
    assert httpx.get(server.url + "/favicon.ico", timeout=10).status_code == 204


def test_one_failing_request_does_not_affect_others(server, monkeypatch):
    original = server.service._run

    def flaky(payloads, should_stop=None):
        if any(p["text"] == "炸" for p in payloads):
            raise RuntimeError("boom")
        return original(payloads, should_stop)

    monkeypatch.setattr(server.service, "_run", flaky)

    def one(text):
        return httpx.post(server.url + "/", json={"text": text, "num_inference_steps": 2}, timeout=60).status_code

    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(one, ["好", "炸", "好", "好"]))
    assert statuses.count(200) == 3 and statuses.count(500) == 1
    assert one("好") == 200
    metrics = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'easynlp_requests_total{status="500"} 1' in metrics and 'easynlp_responses_total{status="500"} 1' in metrics


def test_queue_full_429_and_timeout(tiny_model_dir):
    running = InProcessServer(tiny_model_dir, max_batch_size=1, max_wait_ms=0, max_queue=1, request_timeout=1.0)
    try:
        def slow(_):
            r = httpx.post(running.url + "/", json={"text": "慢", "num_inference_steps": 40}, timeout=60)
            return r.status_code, r.headers.get("retry-after")

        with ThreadPoolExecutor(6) as pool:
            results = list(pool.map(slow, range(6)))
        statuses = [s for s, _ in results]
        assert 450 in statuses and all(h == "1" for s, h in results if s == 450)  # EAS's queue-full status
        assert set(statuses) & {408, 504}
    finally:
        running.stop()


def test_with_a_token_every_route_but_health_and_the_page_needs_it(tiny_model_dir):
    running = InProcessServer(tiny_model_dir, api_token="s3cret", docs=True, service_name="t2i")
    try:
        body = {"text": "测试", "num_inference_steps": 2}
        for token, status in ((None, 401), ("Bearer wrong", 401), ("s3cret", 200), ("Bearer s3cret", 200)):
            headers = {"Authorization": token} if token else {}
            for path in ("/", "/predict", "/api/predict/t2i"):
                assert httpx.post(running.url + path, json=body, headers=headers, timeout=30).status_code == status
            for path in ("/metrics", "/info", "/openapi.json", "/docs"):
                assert httpx.get(running.url + path, headers=headers, timeout=30).status_code == status, path
        assert httpx.post(running.url + "/api/predict/other", json=body, timeout=30).status_code == 404
        health = httpx.get(running.url + "/health", timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "ready"}
        info = httpx.get(running.url + "/info", headers={"Authorization": "s3cret"}, timeout=10).json()
        assert os.sep not in json.dumps(info) and info["model"] == "pai-diffusion-general-large-zh"
        assert info["limits"]["max_size"] == 64 and info["limits"]["max_body_bytes"] == 16 * 2**20
        assert httpx.get(running.url + "/", timeout=10).status_code == 200  # the static page asks for the token
    finally:
        running.stop()


def test_eas_signed_requests(tiny_model_dir):
    from easynlp_ldm.serving.auth import eas_signature

    running = InProcessServer(tiny_model_dir, api_token="s3cret")
    try:
        def post(body, date=None, token="s3cret", sent=None, md5=None):
            date = date or email.utils.formatdate(usegmt=True)
            headers = {"Date": date, "Content-Type": "application/octet-stream",
                       "Content-MD5": md5 or hashlib.md5(body).hexdigest(),
                       "Authorization": eas_signature(token, body, "application/octet-stream", date,
                                                      "/api/predict/t2i")}
            return httpx.post(running.url + "/api/predict/t2i", content=sent or body, headers=headers, timeout=30)

        body = json.dumps({"text": "测试", "num_inference_steps": 2}).encode()
        assert post(body).status_code == 200
        assert post(body, token="wrong").status_code == 401
        stale = email.utils.formatdate(time.time() - 3600 * 30, usegmt=True)
        assert post(body, date=stale).status_code == 401
        # the SDK stamps local time labelled GMT: a client at UTC+8 is accepted
        assert post(body, date=email.utils.formatdate(time.time() + 8 * 3600, usegmt=True)).status_code == 200
        tampered = json.dumps({"text": "别的", "num_inference_steps": 2}).encode()
        assert post(body, sent=tampered).status_code == 401  # the body's MD5 no longer matches
        assert post(body, sent=tampered, md5=hashlib.md5(tampered).hexdigest()).status_code == 401  # nor the signature
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


# ------------------------------------------------------------------------------------- generation from images




def b64(image, image_format="png"):
    return encode_image_base64(image, image_format)


@pytest.fixture(scope="module")
def controlnet_dir(tiny_model_dir, tmp_path_factory):
    return make_test_controlnet(tiny_model_dir, str(tmp_path_factory.mktemp("controlnet") / "canny"))


def served(url, body):
    response = httpx.post(url + "/", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return [np.asarray(png(b), dtype=np.int16) for b in response.json()["images_base64"]]


def generated(service, prompts, seeds, inputs, **settings):
    settings = dataclasses.replace(service.defaults, **settings)
    with torch.inference_mode():
        images = Generator(service.model, settings, service.text_length)(prompts, seeds, inputs=inputs)
    return [np.asarray(image, dtype=np.int16) for image in images]


def assert_close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert np.abs(x - y).max() <= 3, np.abs(x - y).max()


def test_img2img_request_matches_the_generator_and_batches_apart_from_text_only_requests(server, monkeypatch):
    original, batches = server.service._run, []

    def recorded(payloads, should_stop=None):
        batches.append([p["image"] is not None for p in payloads])
        return original(payloads, should_stop)

    monkeypatch.setattr(server.service, "_run", recorded)
    image = photo(1)
    body = {"text": "测试文本", "num_inference_steps": 3, "num_images": 2, "seed": 5, "strength": 0.6}
    expected = generated(server.service, ["测试文本"] * 2, [5, 6], ImageInputs(images=[image, image]), steps=3,
                         strength=0.6)
    # sent at once with text-only requests of the same settings: they must not share a model call with them
    bodies = [{**body, "image": b64(image)}, {**body, "seed": 9}, {**body, "image": "data:image/jpeg;base64,"
                                                                             + b64(image.copy(), "jpeg")}, body]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda b: served(server.url, b), bodies))
    assert_close(results[0], expected)
    assert np.abs(results[0][0] - results[3][0]).max() > 10  # the image mattered
    assert len(results[2]) == 2  # a JPEG data URI is accepted
    assert all(len(set(batch)) == 1 for batch in batches) and sum(map(len, batches)) == 4


def test_inpainting_request_with_a_mask(server):
    image = photo(3)
    body = {"text": "测试文本", "num_inference_steps": 3, "seed": 7, "image": b64(image), "mask": b64(mask())}
    expected = generated(server.service, ["测试文本"], [7], ImageInputs(images=[image], masks=[mask()]), steps=3)
    assert_close(served(server.url, body), expected)


def test_controlnet_service_takes_control_image(tiny_model_dir, controlnet_dir):
    running = InProcessServer(tiny_model_dir, controlnet=controlnet_dir)
    try:
        control = photo(5)
        body = {"text": "测试文本", "num_inference_steps": 3, "seed": 3, "control_image": b64(control)}
        expected = generated(running.service, ["测试文本"], [3], ImageInputs(controls=[[control]]), steps=3)
        assert_close(served(running.url, body), expected)
        assert_close(served(running.url, {**body, "control_image": [b64(control)]}), expected)
        plain = generated(running.service, ["测试文本"], [3], None, steps=3, controlnets=())
        assert np.abs(plain[0] - expected[0]).max() > 10  # the ControlNet mattered
        for wrong in ({k: v for k, v in body.items() if k != "control_image"},
                      {**body, "control_image": [b64(control)] * 2}, {**body, "control_image": 5}):
            response = httpx.post(running.url + "/", json=wrong, timeout=30)
            assert response.status_code == 400 and response.json()["field"] == "control_image"
        info = httpx.get(running.url + "/info", timeout=10).json()
        assert info["controlnets"] == 1 and "control_image" in info["fields"] and os.sep not in json.dumps(info)
    finally:
        running.stop()


def test_canny_runs_on_the_control_image_as_sent_as_in_predict(tiny_model_dir, controlnet_dir):
    """Serve shrinks images to the generation size as it parses them; a preprocessor must still see the image as sent
    (predict and diffusers' users run canny at full size): edges of a shrunk image are other edges."""
    running = InProcessServer(tiny_model_dir, controlnet=controlnet_dir, control_preprocessor="canny")
    try:
        from PIL import Image, ImageDraw

        control = Image.new("RGB", (96, 96))  # sharp edges, three times the generation size
        ImageDraw.Draw(control).ellipse((10, 20, 80, 70), fill=(255, 255, 255))
        ImageDraw.Draw(control).rectangle((40, 5, 60, 90), fill=(90, 90, 90))
        body = {"text": "测试文本", "num_inference_steps": 3, "seed": 3, "control_image": b64(control)}
        expected = generated(running.service, ["测试文本"], [3], ImageInputs(controls=[[control]]), steps=3)
        assert_close(served(running.url, body), expected)
        # What the ControlNet is fed (the tiny random ControlNet barely changes the image, so look at its input):
        from appzoo.latent_diffusion.conditioning import canny, preprocess_control

        parsed = running.service.parse(body).payload
        fed = preprocess_control(parsed["controls"][0], parsed["settings"].control_preprocessor)
        assert np.asarray(fed).tolist() == np.asarray(fit(canny(control), 32, 32)).tolist()
        assert np.abs(np.asarray(fed, np.int16) - np.asarray(canny(fit(control, 32, 32)), np.int16)).max() > 100
    finally:
        running.stop()


def _not_an_image():
    return base64.b64encode(b"hello, not an image").decode()


def _png_of(size):
    buffer = io.BytesIO()
    mask(size).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("fields,field,words", [
    ({"mask": _png_of((32, 32))}, "mask", "needs image"),
    ({"image": _png_of((32, 32)), "mask": _png_of((16, 16))}, "mask", "16×16"),
    ({"image": _not_an_image()}, "image", "not an image"),
    ({"image": "%%%"}, "image", "base64"),
    ({"image": 5}, "image", "base64"),
    ({"image": _png_of((32, 32)), "mask": _not_an_image()}, "mask", "not an image"),
    ({"control_image": _png_of((32, 32))}, "control_image", "controlnet="),
    ({"image": _png_of((32, 32)), "strength": 1.5}, "strength", "between 0 and 1"),
    ({"image": _png_of((32, 32)), "guidance_rescale": 0.5}, "guidance_rescale", "guidance_rescale")])
def test_bad_image_fields_are_400_naming_the_field(server, fields, field, words):
    response = httpx.post(server.url + "/", json={"text": "测试", "num_inference_steps": 1, **fields}, timeout=30)
    assert response.status_code == 400
    assert response.json()["field"] == field and field in response.json()["error"]
    assert words in response.json()["error"]
