"""export.py: the tar package EasyNLP's EAS deployment expects (and serve loads), and the diffusers folder."""

import json
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
import pytest
import torch

from easynlp_ldm import cli
from tests.helpers import ROOT, cell_pixels, easynlp_checkpoint, free_port, png, wait_ready


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


@pytest.mark.parametrize("text_class", ["CLIPTextModel", "BertModel"])
def test_diffusers_export_text_encoder_uses_the_names_transformers_4_reads(tiny_model_dir, tmp_path, text_class):
    """transformers 5 saves CLIPTextModel without its 4.x ``text_model.`` prefix, which 4.x (e.g. 4.57, which
    optimum's exporters pin) silently loads as random weights. The export writes the 4.x names, which the current
    transformers maps on load: both get identical weights (checked with 4.57.6 and 4.51.3 in scratch venvs).
    BertModel's names are the same in both."""
    import transformers
    from safetensors import safe_open

    from appzoo.latent_diffusion.loading import load_model

    model_dir = tiny_model_dir
    if text_class == "BertModel":  # the tiny model with a BertModel text encoder
        model_dir = str(tmp_path / "bert_model")
        shutil.copytree(tiny_model_dir, model_dir)
        shutil.rmtree(os.path.join(model_dir, "text_encoder"))
        vocab_size = len(open(os.path.join(model_dir, "tokenizer", "vocab.txt"), encoding="utf-8").read().split())
        transformers.BertModel(transformers.BertConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32, pad_token_id=0)).save_pretrained(os.path.join(model_dir, "text_encoder"))
        index_path = os.path.join(model_dir, "model_index.json")
        index = json.load(open(index_path, encoding="utf-8"))
        index["text_encoder"] = ["transformers", "BertModel"]
        with open(index_path, "w", encoding="utf-8") as handle:
            json.dump(index, handle)
    out = str(tmp_path / "diffusers")
    assert cli.main(["--mode=export", f"--checkpoint_dir={model_dir}", f"--outputs={out}",
                     "--user_defined_parameters=export_format=diffusers"]) == 0
    expected = {name: value for name, value in load_model(model_dir).text_encoder.state_dict().items()
                if not name.endswith("position_ids")}
    folder = os.path.join(out, "text_encoder")
    config = json.load(open(os.path.join(folder, "config.json"), encoding="utf-8"))
    assert config["architectures"] == [text_class]
    with safe_open(os.path.join(folder, "model.safetensors"), framework="pt") as handle:
        saved = {name: handle.get_tensor(name) for name in handle.keys()}
    if text_class == "CLIPTextModel":  # 4.x: CLIPTextModel.text_model (CLIPTextTransformer) holds every module
        assert config["model_type"] == "clip_text_model"
        assert {"text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight",
                "text_model.encoder.layers.0.self_attn.q_proj.weight"} <= set(saved)
        legacy = {"text_model." + name: value for name, value in expected.items()}
    else:  # 4.x BertModel: embeddings.…, encoder.layer.N.…, pooler.…
        assert {"embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
                "pooler.dense.weight"} <= set(saved)
        legacy = expected
    assert set(saved) == set(legacy) and all(torch.equal(saved[name], legacy[name]) for name in legacy)
    # The current transformers (and so diffusers' from_pretrained) loads them as the same weights.
    loaded, info = getattr(transformers, text_class).from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = loaded.state_dict()
    assert all(torch.equal(state[name], value) for name, value in expected.items())


def test_easynlp_model_exports_to_a_diffusers_folder_that_loads_and_converts_back(tmp_path):
    """Issue 30 §4: the export of an EasyNLP (Wukong text encoder) model wrote ``"text_encoder": [null, null]``, said
    diffusers loads it, and exited 0. Now the encoder is saved with its code: diffusers loads the folder with
    trust_remote_code (the folder's own copy of the class) and generates predict's image, this toolkit predicts the
    EasyNLP folder's images from it, and it converts back to EasyNLP's format tensor for tensor."""
    from diffusers import StableDiffusionPipeline

    from modelzoo.esrgan import RRDBNet
    from modelzoo.formats import easynlp

    source = easynlp_checkpoint(tmp_path / "easynlp")
    torch.save(RRDBNet(nf=8, nb=1, gc=4).state_dict(), os.path.join(source, "RRDB_ESRGAN_x4.pth"))
    out = str(tmp_path / "diffusers")
    assert cli.main(["--mode=export", f"--checkpoint_dir={source}", f"--outputs={out}",
                     "--user_defined_parameters=export_format=diffusers"]) == 0
    index = json.load(open(os.path.join(out, "model_index.json"), encoding="utf-8"))
    assert index["text_encoder"] == ["wukong", "WukongTextEncoder"]
    assert index["_esrgan_channel_order"] == "bgr"  # EasyNLP's ESRGAN is fed BGR; the folder keeps saying so
    table = tmp_path / "p.tsv"
    table.write_text("1\t一只红色的圆形\n", encoding="utf-8")
    cells = []
    for folder in (source, out):
        result = tmp_path / f"{os.path.basename(folder)}.tsv"
        assert cli.main(["--mode=predict", f"--tables={table}", f"--outputs={result}", f"--checkpoint_dir={folder}",
                         "--output_schema=seed,gen_imgbase64",
                         "--user_defined_parameters=n_samples=1 ddim_steps=3 optimize=none"]) == 0
        cells.append(result.read_text().strip().split("\t"))
    # this toolkit: the same seeds and images from either folder (the files' AIGC ProduceIDs differ by run)
    seeds_and_pixels = [(seed, cell_pixels(cell)) for seed, cell in cells]
    assert seeds_and_pixels[0] == seeds_and_pixels[1]
    pipe = StableDiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(pipe.text_encoder).__module__.endswith(".wukong") and not type(pipe.text_encoder).__module__.startswith(
        "modelzoo")  # the class diffusers built is the folder's text_encoder/wukong.py, not this toolkit's
    pipe.set_progress_bar_config(disable=True)
    seed, cell = cells[1]
    reference = pipe("一只红色的圆形", generator=torch.Generator("cpu").manual_seed(int(seed)), num_inference_steps=3,
                     guidance_scale=5.0, height=32, width=32).images[0]
    assert np.abs(np.asarray(png(cell), dtype=np.int16) - np.asarray(reference, dtype=np.int16)).max() <= 3
    back = str(tmp_path / "back")
    assert cli.main(["--mode=export", f"--checkpoint_dir={out}", f"--outputs={back}",
                     "--user_defined_parameters=export_format=easynlp"]) == 0
    original = torch.load(os.path.join(source, "pytorch_model.bin"), weights_only=True)
    written = torch.load(os.path.join(back, "pytorch_model.bin"), weights_only=True)
    # A diffusers folder holds one UNet, the EMA weights EasyNLP samples with: they come back as the UNet's weights.
    # Everything else (text encoder, VAE, noise schedule buffers) is the original tensor for tensor.
    expected = {key: original[easynlp.ema_name(key) if key.startswith(easynlp.UNET_PREFIX) else key]
                for key in original if not key.startswith(easynlp.EMA_PREFIX)}
    assert set(written) == set(expected)
    assert all(written[k].dtype == v.dtype and torch.equal(written[k], v) for k, v in expected.items())
    assert open(os.path.join(back, "vocab.txt"), "rb").read() == open(os.path.join(source, "vocab.txt"), "rb").read()
    assert open(os.path.join(back, "RRDB_ESRGAN_x4.pth"), "rb").read() == \
        open(os.path.join(source, "RRDB_ESRGAN_x4.pth"), "rb").read()


@pytest.mark.parametrize("export_format", ["tar", "diffusers", "easynlp"])
def test_an_export_that_does_not_load_back_fails_and_leaves_nothing(tmp_path, monkeypatch, capsys, export_format):
    """Each export loads what it wrote, the way it says it loads (diffusers' StableDiffusionPipeline for a diffusers
    folder, this toolkit otherwise), before it is in place: a writer fault (here vocab.txt with [CLS] and [SEP]
    swapped) is an error naming the format, and nothing is left at --outputs."""
    from modelzoo import text_encoder as te

    written = te.vocab_lines

    def faulty_vocab_lines(tokenizer):
        lines = written(tokenizer).splitlines(keepends=True)
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        lines[cls], lines[sep] = lines[sep], lines[cls]
        return "".join(lines)

    monkeypatch.setattr(te, "vocab_lines", faulty_vocab_lines)
    source = easynlp_checkpoint(tmp_path / "easynlp")
    out = str(tmp_path / ("model.tar.gz" if export_format == "tar" else "exported"))
    assert cli.main(["--mode=export", f"--checkpoint_dir={source}", f"--outputs={out}",
                     f"--user_defined_parameters=export_format={export_format}"]) == 2
    assert f"export_format={export_format}: the export does not load as it should" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["easynlp"]  # neither the export nor a temporary file is left
