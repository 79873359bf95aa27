"""export.py: the tar package EasyNLP's EAS deployment expects (and serve loads), and the diffusers folder."""

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

import httpx
import numpy as np
import torch

from easynlp_ldm import cli
from tests.helpers import ROOT, free_port, png, wait_ready


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
