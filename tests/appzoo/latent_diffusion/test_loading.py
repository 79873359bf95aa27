"""loading.py: one path from a name, folder or package to a ready model, with plain arguments."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from appzoo.latent_diffusion.loading import load_model
from easynlp_ldm import cli
from easynlp_ldm.errors import UserError
from modelzoo.pretrained import DEFAULT_MODEL, embedded_models
from tests.helpers import ROOT, cell_pixels, free_port, png, predict_argv, read_rows, wait_ready


@pytest.fixture(scope="module")
def package(tiny_model_dir, tmp_path_factory):
    """The tiny model as --mode=export packs it."""
    path = str(tmp_path_factory.mktemp("package") / "finetuned_model.tar.gz")
    assert cli.main(["--mode=export", f"--checkpoint_dir={tiny_model_dir}", f"--outputs={path}"]) == 0
    return path


def unpacked_copies(tmp):
    return sorted(name for name in os.listdir(tmp) if name.startswith("easynlp-model-"))


def child_env(tmp_path):
    """The environment of a child process whose temporary folder is ``tmp_path/tmp`` (returned too)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return dict(os.environ, PYTHONPATH=ROOT, TMPDIR=str(tmp), EASYNLP_LOG_LEVEL="WARNING"), str(tmp)


def test_folder_package_and_embedded_default_load_the_same_way(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir, device="cpu")
    assert model.source_path == tiny_model_dir and not model.training
    package = str(tmp_path / "m.tar.gz")
    assert cli.main(["--mode=export", f"--checkpoint_dir={tiny_model_dir}", f"--outputs={package}"]) == 0
    unpacked = load_model(package, device="cpu")  # what --mode=export wrote, as serve and predict take it
    for name, value in model.unet.state_dict().items():
        assert torch.equal(value, unpacked.unet.state_dict()[name])
    assert DEFAULT_MODEL in embedded_models()
    assert load_model("", device="cpu").source_path == embedded_models()[DEFAULT_MODEL]


LOAD_AND_END = """
import sys
from appzoo.latent_diffusion.loading import load_model
model = load_model(sys.argv[1], device="cpu")
print(model.source_path, flush=True)
sys.stdin.readline()  # until the test has looked
raise RuntimeError("a fault after loading")
"""


@pytest.mark.parametrize("ending", ["raise", "sigterm"])
def test_the_unpacked_package_is_removed_however_the_process_ends(package, tmp_path, ending):
    env, tmp = child_env(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", LOAD_AND_END, package], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        unpacked = child.stdout.readline().strip()
        assert os.path.dirname(unpacked) == tmp and os.path.isfile(os.path.join(unpacked, "config.json"))
        if ending == "sigterm":
            child.send_signal(signal.SIGTERM)
        else:
            child.stdin.write("\n")
            child.stdin.flush()
        code = child.wait(60)
    finally:
        if child.poll() is None:
            child.kill()
    assert code == (1 if ending == "raise" else -signal.SIGTERM)
    assert unpacked_copies(tmp) == []


def test_serving_a_package_names_it_drains_on_sigterm_and_leaves_no_copy(package, tmp_path):
    """What a load balancer sees while a server stops: /health answers 503 "shutting down" and new work 503 while
    the request in flight finishes; then the process ends and its unpacked copy of the model is gone."""
    env, tmp = child_env(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "easynlp_ldm.cli", "--mode=serve", f"--checkpoint_dir={package}",
                                f"--port={port}", "--user_defined_parameters=ddim_steps=2 max_steps=2000 "
                                "max_request_work=10000 optimize=none shutdown_timeout=300"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(url, process=process)
        assert len(unpacked_copies(tmp)) == 1
        assert httpx.get(url + "/info", timeout=10).json()["model"] == "finetuned_model.tar.gz"
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=httpx.post(
            url + "/", json={"text": "测试文本", "num_inference_steps": 100}, timeout=300)))
        thread.start()
        while "easynlp_batch_size_images_count 1" not in httpx.get(url + "/metrics", timeout=10).text:
            time.sleep(0.05)  # until its batch runs
        process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while (health := httpx.get(url + "/health", timeout=10)).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert health.status_code == 503 and health.json()["status"] == "shutting down"
        refused = httpx.post(url + "/", json={"text": "测试文本", "num_inference_steps": 1}, timeout=10)
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]
        assert thread.is_alive()  # all of this while the request in flight still runs
        thread.join(300)
        assert result["r"].status_code == 200, result["r"].text
        assert png(result["r"].json()["images_base64"][0])
        assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after a clean shutdown
    finally:
        if process.poll() is None:
            process.kill()
    assert unpacked_copies(tmp) == []


def test_optimize_level_is_applied_only_when_asked(tiny_model_dir):
    assert getattr(load_model(tiny_model_dir, device="cpu"), "optimization", None) is None
    assert load_model(tiny_model_dir, device="cpu", optimize="none").optimization["level"] == "none"


def test_missing_model_is_one_line_naming_the_setting(tmp_path):
    with pytest.raises(UserError, match="pretrain_model_name_or_path 'nowhere/model' not found") as err:
        load_model("nowhere/model", what="pretrain_model_name_or_path")
    assert "\n" not in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a diffusers-layout model"):
        load_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("where", ["MODELSCOPE_CACHE", "HOME"])
def test_predict_finds_a_model_downloaded_with_modelscope_by_its_name(tiny_model_dir, tmp_path, monkeypatch, where):
    """`modelscope download --model PAI/pai-diffusion-tiny-zh-v1.0` (SDK 1.2x-1.37, which writes the dot as ___), under
    $MODELSCOPE_CACHE or, unset, its default ~/.cache/modelscope/hub: the name alone finds it, with no other hub."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-empty"))
    monkeypatch.setenv("EASYNLP_CACHE_ROOT", str(tmp_path / "easynlp-empty"))
    if where == "HOME":
        monkeypatch.delenv("MODELSCOPE_CACHE", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
        root = tmp_path / "home" / ".cache" / "modelscope" / "hub"
    else:
        monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "ms"))
        root = tmp_path / "ms"
    folder = root / "models" / "PAI" / "pai-diffusion-tiny-zh-v1___0"
    shutil.copytree(tiny_model_dir, folder)
    name = "PAI/pai-diffusion-tiny-zh-v1.0"
    assert load_model(name, device="cpu", what="pretrain_model_name_or_path").source_path == str(folder)
    table = tmp_path / "p.tsv"
    table.write_text("1\t蓝色的正方形\n", encoding="utf-8")
    images = []
    for model in (name, tiny_model_dir):
        out = tmp_path / f"out-{len(images)}.tsv"
        assert cli.main(predict_argv(table, out, model, udp="ddim_steps=2 n_samples=1 optimize=none")) == 0
        images.append(read_rows(out)[0][-1])
    assert cell_pixels(images[0]) == cell_pixels(images[1])  # the same model, by its ModelScope name and by its folder
