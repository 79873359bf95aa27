"""The text encoder of a Z-Image / Qwen-Image run leaves memory once the text-embedding cache holds every caption
(issue 32, Build 3): its parameters end on the meta device and the model holds none; TensorBoard's sample images are
drawn from the cached embeddings (negative prompt included) and are the images the pipeline draws from the prompts;
checkpoints write the text encoder's files from the folder the model was read from and load and predict as the
model; a model read from no folder keeps its encoder; the memory plan counts the encoder's weights in the
cache-filling phase only, and the LoRA rank the run asks for."""

import filecmp
import logging
import os

import numpy as np
import pytest
import torch

from appzoo.latent_diffusion import memory_plan, train
from appzoo.latent_diffusion.generation import generate
from appzoo.latent_diffusion.settings import GenerationSettings
from easynlp_ldm import cli, memory
from modelzoo import families
from modelzoo.families.dit import DiTFamily
from modelzoo.families.dit_memory import lora_shapes
from modelzoo.tiny_dit import make_tiny_qwenimage_model, make_tiny_zimage_model
from tests.helpers import train_argv

MAKERS = {"zimage": make_tiny_zimage_model, "qwenimage": make_tiny_qwenimage_model}
FAST = ["--micro_batch_size=8", "--warmup_proportion=0", "--max_grad_norm=0"]
SAMPLES = 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {name: make(str(root / name)) for name, make in MAKERS.items()}


def _logged_images(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "log"), size_guidance={"images": 0})
    events.Reload()
    return {tag: len(events.Images(tag)) for tag in events.Tags()["images"]}


def _train(monkeypatch, argv):
    """Train; returns the run's task and the text encoder module as it was before it was released."""
    built, encoders = [], []
    build, release = train.build_task, DiTFamily.release_text_encoder

    def keep(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    def watched(family, model):
        encoders.append(model.text_encoder)
        return release(family, model)

    monkeypatch.setattr(train, "build_task", keep)
    monkeypatch.setattr(DiTFamily, "release_text_encoder", watched)
    assert cli.main(argv) == 0
    return built[-1], encoders[-1]


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_a_run_releases_its_text_encoder_samples_from_the_cache_and_saves_a_folder_that_predicts_alike(
        folders, shapes_data, tmp_path, monkeypatch, caplog, name):
    caplog.set_level(logging.INFO)
    run = str(tmp_path / "run")
    task, encoder = _train(monkeypatch, train_argv(
        shapes_data, run, folders[name], *FAST, "--epoch_num=2", "--learning_rate=2e-3",
        udp=f"train_target=transformer caption_dropout=0 use_ema=False sample_images={SAMPLES} sample_steps=3 "
            f"sample_time_share=1"))
    # the cache filled first (no file yet: every caption encoded), then the encoder gone
    released = caplog.text.index(f"text encoder released after caching {len(task.texts)} captions")
    assert caplog.text.index(f"{len(task.texts)} captions encoded once") < released
    params = list(encoder.parameters())
    assert params and all(p.device.type == "meta" for p in params)  # no storage left behind
    assert task.model.text_encoder is None
    # TensorBoard's samples at each checkpoint, drawn without the encoder
    logged = _logged_images(run)
    assert sorted(logged) == [f"samples/{i}" for i in range(SAMPLES)] and all(logged.values())
    # the checkpoint's text encoder: the files of the folder the model was read from
    source, saved = (os.path.join(folder, "text_encoder") for folder in (folders[name], run))
    files = sorted(os.listdir(source))
    assert files == sorted(os.listdir(saved))
    assert all(filecmp.cmp(os.path.join(source, f), os.path.join(saved, f), shallow=False) for f in files)
    # the task's samples (cached embeddings, guidance with the empty prompt's) are what the pipeline draws from the
    # prompts with the saved folder's text encoder and the trained transformer
    samples = task.sample_images(SAMPLES)
    loaded = families.load(run)
    settings = GenerationSettings(steps=3, height=task.resolution, width=task.resolution)
    captions = [caption for caption, _ in samples]
    expected = generate(loaded, captions, [task.seed + i for i in range(SAMPLES)], settings,
                        max_length=task.text_length)
    for (_, image), want in zip(samples, expected):
        assert np.abs(np.asarray(image, np.int16) - np.asarray(want, np.int16)).max() <= 1
    assert np.asarray(samples[0][1]).std() > 0


def test_a_model_read_from_no_folder_keeps_its_text_encoder(folders):
    model = families.load(folders["zimage"])
    family = families.family_of(model)
    model.source_path = None
    assert family.release_text_encoder(model) == 0 and model.text_encoder is not None
    kept = family.memory_footprint(model, train_target="lora", text_length=32)
    assert "text_encoder" in kept.frozen and kept.encode_only_bytes == 0


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_the_plan_counts_the_text_encoder_while_it_fills_the_cache_only(folders, name):
    model = families.load(folders[name])
    family = families.family_of(model)
    encoder_bytes = sum(p.numel() * p.element_size() for p in model.text_encoder.parameters())
    settings = memory.MemorySettings(micro_batch_size=1, resolution=64, gradient_checkpointing=False, use_amp=False,
                                     optimizer="adamw", use_ema=False, ema_device="", save_optimizer=True,
                                     device="cpu")
    for target in ("transformer", "lora"):
        leaves = family.memory_footprint(model, train_target=target, text_length=32)  # read from a folder: it leaves
        resident = family.memory_footprint(model, train_target=target, text_length=32, text_encoder_leaves=False)
        assert "text_encoder" not in leaves.frozen and resident.frozen["text_encoder"] * 4 == encoder_bytes
        after, before = memory.estimate(leaves, settings), memory.estimate(resident, settings)
        assert before.host["step"] - after.host["step"] == encoder_bytes
        assert before.host["save"] - after.host["save"] == encoder_bytes
        for phase in ("load", "encode"):  # every weight (and the encoder's pass), as before
            assert after.host[phase] == before.host[phase]
        assert after.footprint.encode_only_bytes == encoder_bytes
        assert after.peak == max(after.host.values())


def test_zimage_turbos_plan_drops_by_its_text_encoders_weights():
    """Z-Image-Turbo's LoRA at 1024² on a GPU (bf16, checkpointing): the Qwen3-4B's 7.5 GiB leave the step's."""
    import json

    from bench.train_memory import meta_zimage_model
    from tests.helpers import ROOT

    with open(os.path.join(ROOT, "bench", "configs", "zimage_turbo.json"), encoding="utf-8") as handle:
        turbo = meta_zimage_model(json.load(handle), torch.bfloat16)
    encoder_bytes = sum(p.numel() * p.element_size() for p in turbo.text_encoder.parameters())
    assert 7.4 < encoder_bytes / memory.GIB < 7.6
    family = families.family_of(turbo)
    settings = memory.MemorySettings(micro_batch_size=1, resolution=1024, gradient_checkpointing=True, use_amp=True,
                                     optimizer="adamw", use_ema=False, ema_device="", save_optimizer=True,
                                     device="cuda")
    estimates = {leaves: memory.estimate(family.memory_footprint(turbo, train_target="lora", text_length=512,
                                                                 lora_rank=16, text_encoder_leaves=leaves), settings)
                 for leaves in (False, True)}
    assert estimates[False].device["step"] - estimates[True].device["step"] == encoder_bytes
    assert estimates[True].peak < 24 * memory.GIB < estimates[False].peak + encoder_bytes


def test_the_plan_counts_the_lora_rank_the_run_asks_for(folders, shapes_data, tmp_path, monkeypatch):
    planned = []
    check = memory_plan.check
    monkeypatch.setattr(memory_plan, "check", lambda footprint, *a, **k: planned.append(footprint) or check(
        footprint, *a, **k))
    assert cli.main(train_argv(shapes_data, str(tmp_path / "run"), folders["zimage"], *FAST, "--epoch_num=1",
                               udp="train_target=lora lora_rank=8 use_ema=False sample_images=0")) == 0
    model = families.load(folders["zimage"])
    adapters = lora_shapes(model.transformer, ("to_q", "to_k", "to_v", "to_out.0"), 8)
    assert planned[-1].trained == {"lora": adapters} and all(8 in shape for shape in adapters)
    rank4 = families.family_of(model).memory_footprint(model, train_target="lora", text_length=32)
    assert planned[-1].trained_count == 2 * rank4.trained_count
    assert planned[-1].encode_only_bytes > 0  # read from a folder: it leaves after the cache
