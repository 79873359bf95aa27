"""The service through the clients users have: Alibaba's eas-prediction SDK (as PAI-EAS's docs use it, no
custom_url), the openai package's images API, and curl as EAS's docs write it."""

import email.utils
import hashlib
import json
import os
import re
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import ROOT, InProcessServer, png

SDK_SCRIPT = r"""
import json, sys
from eas_prediction import PredictClient, StringRequest
from eas_prediction.exception import PredictException
endpoint, service, token, body = sys.argv[1:5]
client = PredictClient(endpoint, service)
if token:
    client.set_token(token)
client.set_retry_count(1)
client.init()
try:
    response = client.predict(StringRequest(body))
    print(json.dumps({"status": 200, "body": json.loads(response.response_data)}))
except PredictException as err:
    print(json.dumps({"status": err.code, "body": str(err.message)}))
"""


def sdk(url, service, token, body):
    """One predict call through eas-prediction 0.36, in its own interpreter: it pins protobuf 3.20, which this
    environment does not have, so its generated modules load with the pure-Python protobuf."""
    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    done = subprocess.run([sys.executable, "-c", SDK_SCRIPT, url, service, token or "", json.dumps(body)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def secured(tiny_model_dir):
    running = InProcessServer(tiny_model_dir, api_token="s3cret-token")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def open_server(tiny_model_dir):
    running = InProcessServer(tiny_model_dir)
    yield running
    running.stop()


BODY = {"text": "白色背景上的红色圆形", "num_inference_steps": 2, "num_images": 2}


def test_eas_sdk_without_a_token(open_server):
    answer = sdk(open_server.url, "my_t2i_service", None, BODY)
    assert answer["status"] == 200 and answer["body"]["text"] == BODY["text"]
    assert [png(b).size for b in answer["body"]["images_base64"]] == [(32, 32)] * 2


def test_eas_sdk_signs_with_the_token(secured):
    answer = sdk(secured.url, "my_t2i_service", "s3cret-token", BODY)
    assert answer["status"] == 200 and len(answer["body"]["images_base64"]) == 2
    wrong = sdk(secured.url, "my_t2i_service", "not-the-token", BODY)
    assert wrong["status"] == 401 and "signature" in wrong["body"]
    bad = sdk(secured.url, "my_t2i_service", "s3cret-token", {"text": "x", "num_images": 99})
    assert bad["status"] == 400 and "num_images" in bad["body"]


def signed_post(server, body: bytes, date_offset_s: float = 0.0):
    """A request as the EAS SDK signs it (resource /api/predict/<service>, Date in local time labelled GMT)."""
    from easynlp_ldm.serving.auth import eas_signature

    date = email.utils.formatdate(time.time() + date_offset_s, usegmt=True)
    headers = {"Date": date, "Content-Type": "application/octet-stream", "Content-MD5": hashlib.md5(body).hexdigest(),
               "Authorization": eas_signature("s3cret-token", body, "application/octet-stream", date,
                                              "/api/predict/my_t2i_service")}
    return lambda: httpx.post(server.url + "/api/predict/my_t2i_service", content=body, headers=headers, timeout=60)


@pytest.mark.parametrize("zone_h", [0, -12.2, 14.2], ids=["utc", "utc-12", "utc+14"])
def test_a_captured_signed_request_is_served_once(secured, zone_h):
    """The SDK's clock may be any time zone's (it labels local time GMT), so a Date is accepted for about a day:
    the same signature a second time is a replay, refused with 401 in the EAS format."""
    send = signed_post(secured, json.dumps({**BODY, "num_images": 1, "seed": 1}).encode(), zone_h * 3600)
    assert send().status_code == 200
    replay = send()
    assert replay.status_code == 401 and set(replay.json()) == {"error"} and "replay" in replay.json()["error"]


def test_a_signed_request_answered_with_a_server_error_may_be_sent_again(secured, monkeypatch):
    """The SDK retries a 5xx at once with the same Date, hence the same signature: that is no replay."""
    original, calls = secured.service.parse, []

    def fails_once(body):
        calls.append(body)
        if len(calls) == 1:
            raise RuntimeError("a fault of the server")
        return original(body)

    monkeypatch.setattr(secured.service, "parse", fails_once)
    send = signed_post(secured, json.dumps({**BODY, "num_images": 1, "seed": 2}).encode())
    assert send().status_code == 500
    assert send().status_code == 200
    assert send().status_code == 401


def test_curl_as_eas_docs_write_it(secured):
    command = ["curl", "-s", "-w", "\n%{http_code}", f"{secured.url}/api/predict/my_t2i_service", "-H",
               "Authorization: s3cret-token", "-d", json.dumps(BODY, ensure_ascii=False)]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
    body, status = out.rsplit("\n", 1)
    assert status == "200" and len(json.loads(body)["images_base64"]) == 2


def test_openai_images_api(secured):
    from openai import AuthenticationError, BadRequestError, OpenAI

    client = OpenAI(base_url=secured.url + "/v1", api_key="s3cret-token", max_retries=0)
    result = client.images.generate(model="pai-diffusion", prompt="白色背景上的红色圆形", n=3, size="64x64",
                                    response_format="b64_json", extra_body={"num_inference_steps": 2, "seed": 5})
    images = [png(item.b64_json) for item in result.data]
    assert [image.size for image in images] == [(64, 64)] * 3 and result.created > 0
    again = client.images.generate(prompt="白色背景上的红色圆形", n=1, size="64x64",
                                   extra_body={"num_inference_steps": 2, "seed": 5})
    # the seed reproduces the image (alone vs in a batch of three: within 1/255, README "Seeds")
    first, alone = (np.asarray(png(b), dtype=np.int16) for b in (result.data[0].b64_json, again.data[0].b64_json))
    assert np.abs(first - alone).max() <= 1
    with pytest.raises(BadRequestError, match="size"):
        client.images.generate(prompt="圆", size="1000x1000")
    with pytest.raises(BadRequestError, match="response_format"):
        client.images.generate(prompt="圆", response_format="url")
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=secured.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="圆")
    raw = httpx.post(secured.url + "/v1/images/generations", json={"prompt": "圆", "n": 99},
                     headers={"Authorization": "Bearer s3cret-token"}, timeout=30)
    assert raw.status_code == 400 and raw.json()["error"]["param"] == "n"


def readme_block(starting):
    text = open(os.path.join(ROOT, "docs", "serving.md"), encoding="utf-8").read()
    return next(block for block in re.findall(r"```(?:python|bash)\n(.*?)```", text, re.S)
                if block.startswith(starting))


def test_the_readme_eas_examples_run_as_written(secured, tmp_path):
    """The SDK snippet, the curl command and the OpenAI snippet of docs/serving.md (the serving reference the README
    points to), against a service on its address (127.0.0.1:8000 replaced by the test server's) with the token
    filled in."""
    def fill(block):
        return block.replace("http://127.0.0.1:8000", secured.url).replace("<token>", "s3cret-token")

    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    sdk_run = subprocess.run([sys.executable, "-c", fill(readme_block("from eas_prediction"))], capture_output=True,
                             text=True, env=env, timeout=120, cwd=tmp_path)
    assert sdk_run.returncode == 0, sdk_run.stderr
    assert Image.open(tmp_path / "image.png").size == (32, 32)
    curl = subprocess.run(["bash", "-c", fill(readme_block("curl http://127.0.0.1:8000/api/predict"))],
                          capture_output=True, text=True, timeout=120)
    assert len(json.loads(curl.stdout)["images_base64"]) == 1
    namespace = {}
    exec(fill(readme_block("from openai import OpenAI")).replace("64x64", "32x32"), namespace)
    assert len(namespace["images"].data) == 2
