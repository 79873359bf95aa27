import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from easynlp_ldm import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url, timeout=120, process=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(process.stdout.read())
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not become ready")


class InProcessServer:
    def __init__(self, model_dir, **params):
        import uvicorn

        from appzoo.latent_diffusion.loading import load_model
        from appzoo.latent_diffusion.params import PARAMS
        from appzoo.latent_diffusion.serve import LatentDiffusionService
        from easynlp_ldm.serving.server import ServiceSettings, create_app

        values = {p.name: p.default for p in PARAMS}
        values.update(ddim_steps=2, max_steps=40, max_num_images=4, max_size=64)
        token = params.pop("api_token", None)
        values.update(params)
        model = load_model(model_dir)
        self.service = LatentDiffusionService(model, values)
        settings = ServiceSettings(max_batch_size=values["max_batch_size"], max_wait_ms=values["max_wait_ms"],
                                   max_queue=values["max_queue"], request_timeout_s=values["request_timeout"],
                                   api_token=token)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(self.service, settings), host="127.0.0.1", port=self.port,
                                log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_ready(self.url)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    running = InProcessServer(tiny_model_dir, max_batch_size=8, max_wait_ms=100)
    yield running
    running.stop()


def png(b64):
    data = base64.b64decode(b64, validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(data))


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
    ({"text": "x", "do_sr": True}, "do_sr"), ({"text": "x", "seed": -1}, "seed"),
    ({"text": "x", "num_imgs": 2}, "num_imgs"), (["text"], None)])
def test_bad_requests_are_400_naming_the_field(server, body, field):
    response = httpx.post(server.url + "/", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json().get("field") == field


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


def test_export_tar_then_serve_it_and_sigterm_finishes_in_flight(tiny_model_dir, tmp_path):
    package = str(tmp_path / "finetuned_model.tar.gz")
    assert cli.main(["--mode=export", f"--checkpoint_dir={tiny_model_dir}", f"--outputs={package}"]) == 0
    with tarfile.open(package) as archive:
        assert sorted(archive.getnames()) == ["config.json", "pytorch_model.bin", "vocab.txt"]
    port = free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, EASYNLP_LOG_LEVEL="WARNING")
    process = subprocess.Popen([sys.executable, "-m", "easynlp_ldm.cli", "--mode=serve", f"--checkpoint_dir={package}",
                                f"--port={port}", "--user_defined_parameters=ddim_steps=2 max_steps=500"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process=process)
        result = {}

        def long_request():
            result["r"] = httpx.post(url + "/", json={"text": "测试文本", "num_inference_steps": 300}, timeout=120)

        thread = threading.Thread(target=long_request)
        thread.start()
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        thread.join(120)
        assert result["r"].status_code == 200 and png(result["r"].json()["images_base64"][0])
        assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a clean shutdown
    finally:
        if process.poll() is None:
            process.kill()


def test_diffusers_export_generates_the_same_image(tiny_model_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    from modelzoo.esrgan import RRDBNet

    model_dir = str(tmp_path / "model")
    shutil.copytree(tiny_model_dir, model_dir)
    torch.save(RRDBNet(nf=8, nb=1, gc=4).state_dict(), os.path.join(model_dir, "RRDB_ESRGAN_x4.pth"))
    out = str(tmp_path / "diffusers")
    assert cli.main(["--mode=export", f"--checkpoint_dir={model_dir}", f"--outputs={out}",
                     "--user_defined_parameters=export_format=diffusers"]) == 0
    assert os.path.isfile(os.path.join(out, "tokenizer", "vocab.txt"))
    assert os.path.isfile(os.path.join(out, "RRDB_ESRGAN_x4.pth"))
    table = tmp_path / "p.tsv"
    table.write_text("1\t蓝色的正方形\n", encoding="utf-8")
    assert cli.main(["--mode=predict", f"--tables={table}", f"--outputs={tmp_path / 'o.tsv'}",
                     f"--checkpoint_dir={model_dir}", "--output_schema=seed,gen_imgbase64",
                     "--user_defined_parameters=n_samples=1 ddim_steps=5 optimize=none"]) == 0
    seed, cell = open(tmp_path / "o.tsv").read().strip().split("\t")
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe("蓝色的正方形", generator=torch.Generator("cpu").manual_seed(int(seed)), num_inference_steps=5,
                     guidance_scale=5.0, height=32, width=32).images[0]
    ours = np.asarray(png(cell), dtype=np.int16)
    assert np.abs(ours - np.asarray(reference, dtype=np.int16)).max() <= 3
    # Our own loader reads the export too (a diffusers-layout folder).
    assert cli.main(["--mode=export", f"--checkpoint_dir={out}", f"--outputs={tmp_path / 'again.tar.gz'}"]) == 0
