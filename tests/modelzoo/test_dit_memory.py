"""The memory plan of the flow-matching DiTs (modelzoo/families/dit_memory.py through DiTFamily.memory_footprint):
the transformer's activations grow with the resolution and the micro-batch and shrink with gradient checkpointing, a
LoRA's estimate is below full fine-tuning's, a tiny Z-Image run's logged estimate is the plan's and near its measured
peak, --mode=train refuses a DiT run that cannot fit naming what would, and Z-Image-Turbo's real architecture (on the
meta device) gives the README's 24 GB statement."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from easynlp_ldm import cli, memory
from easynlp_ldm.errors import UserError
from modelzoo import families
from modelzoo.families import dit_memory
from modelzoo.tiny_dit import make_tiny_qwenimage_model, make_tiny_zimage_model
from tests.helpers import ROOT, train_argv

GIB = memory.GIB
MAKERS = {"zimage": make_tiny_zimage_model, "qwenimage": make_tiny_qwenimage_model}
BASE = memory.MemorySettings(micro_batch_size=1, resolution=64, gradient_checkpointing=False, use_amp=False,
                             optimizer="adamw", use_ema=True, ema_device="", save_optimizer=True, device="cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {name: make(str(root / name)) for name, make in MAKERS.items()}


@pytest.fixture(scope="module")
def models(folders):
    return {name: families.load(folder) for name, folder in folders.items()}


@pytest.fixture(scope="module")
def turbo():
    """Z-Image-Turbo's architecture in bf16 on the meta device, its text encoder gone (the embedding cache's run)."""
    import json

    import torch

    from bench.train_memory import meta_zimage_model

    with open(os.path.join(ROOT, "bench", "configs", "zimage_turbo.json"), encoding="utf-8") as handle:
        model = meta_zimage_model(json.load(handle), torch.bfloat16)
    model.text_encoder = None
    return model


def activations(footprint, **changes):
    return memory.estimate(footprint, dataclasses.replace(BASE, **changes)).parts["activations"]


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_activations_grow_with_resolution_and_micro_batch_and_shrink_with_checkpointing(models, name):
    model = models[name]
    full = families.family_of(model).memory_footprint(model, train_target="transformer", text_length=32)
    assert isinstance(full.activations, dit_memory.DiTActivations)
    assert full.activations.gradient_bytes == 4 * full.trained_count
    # the count itself (what a run whose gradients are negligible adds)
    footprint = _without_gradient_overlap(full)
    assert 0 < activations(footprint, resolution=32) < activations(footprint) < activations(footprint, resolution=128)
    assert activations(footprint, micro_batch_size=2) == pytest.approx(2 * activations(footprint), rel=1e-6)
    for resolution in (32, 64, 128):
        assert activations(footprint, resolution=resolution, gradient_checkpointing=True) < \
            activations(footprint, resolution=resolution)
    # more text tokens, more activations
    longer = families.family_of(model).memory_footprint(model, train_target="transformer", text_length=128)
    assert activations(_without_gradient_overlap(longer)) > activations(footprint)
    # full fine-tuning: what the backward frees as it allocates the gradients adds only what exceeds them
    for resolution in (32, 128, 512):
        counted = activations(footprint, resolution=resolution)
        assert max(0, counted - 4 * full.trained_count) <= activations(full, resolution=resolution) < counted
    assert activations(full, resolution=512) > 0


def _without_gradient_overlap(footprint):
    return dataclasses.replace(footprint, activations=dataclasses.replace(footprint.activations, gradient_bytes=0))


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_lora_estimate_is_below_full_fine_tuning(models, name):
    model = models[name]
    family = families.family_of(model)
    full = family.memory_footprint(model, train_target="transformer", text_length=32)
    lora = family.memory_footprint(model, train_target="lora", text_length=32, lora_rank=4)
    transformer = sum(p.numel() for p in model.transformer.parameters())
    assert full.trained_count == transformer and 0 < lora.trained_count < transformer  # the adapters
    assert lora.frozen["transformer"] == transformer
    for change in ({}, {"gradient_checkpointing": True}, {"resolution": 128}):
        settings = dataclasses.replace(BASE, **change)
        # the step's (a tiny model's peak is the VAE encoding the latent cache, the same for both)
        assert memory.estimate(lora, settings).host["step"] < memory.estimate(full, settings).host["step"], change


def test_qwenimage_counts_its_dual_stream_blocks(models):
    layout = dit_memory.qwenimage_layout(dict(models["qwenimage"].transformer.config))
    assert [(s.blocks, s.tokens, s.ffn) for s in layout.streams] == [(2, "joint", 4 * 48)] and layout.dim == 48
    zimage = dit_memory.zimage_layout(dict(models["zimage"].transformer.config))
    assert [(s.blocks, s.tokens) for s in zimage.streams] == [(1, "image"), (1, "text"), (2, "joint")]


def test_a_tiny_zimage_run_logs_the_plans_estimate_near_its_peak(folders, shapes_data, tmp_path):
    """The logged estimate is the footprint's, and within a loose band of the run's peak RSS (the tiny model's is
    mostly the runtime's)."""
    argv = [sys.executable, "-m", "easynlp_ldm.cli", *train_argv(
        shapes_data, str(tmp_path / "run"), folders["zimage"], "--micro_batch_size=2", "--sequence_length=32",
        "--epoch_num=1",
        udp="train_target=transformer sample_images=0 use_ema=False")]
    env = dict(os.environ, PYTHONPATH=ROOT, EASYNLP_PROGRESS="0")
    # The run is started by a small Python that reports its peak: a child spawned (vfork + exec) straight from this
    # test process inherits the test process's high-water RSS as its own ru_maxrss (the kernel carries the old
    # memory's peak across exec), gigabytes late in the suite.
    launcher = ("import os, subprocess, sys\n"
                "process = subprocess.Popen(sys.argv[1:])\n"
                "_pid, status, usage = os.wait4(process.pid, 0)\n"
                "print('peak_rss_kib', usage.ru_maxrss)\n"
                "sys.exit(os.waitstatus_to_exitcode(status))\n")
    process = subprocess.run([sys.executable, "-c", launcher, *argv], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    output = process.stdout
    assert process.returncode == 0, output[-2000:]
    logged = float(re.search(r"memory plan: estimated peak ([\d.]+) GiB", output).group(1))
    model = families.load(folders["zimage"])
    footprint = families.family_of(model).memory_footprint(model, train_target="transformer", text_length=32)
    settings = dataclasses.replace(BASE, micro_batch_size=2, resolution=32, use_ema=False)
    assert logged == pytest.approx(memory.estimate(footprint, settings).peak / GIB, abs=0.051)
    measured = int(re.search(r"peak_rss_kib (\d+)", output).group(1)) * 1024 / GIB
    assert 0.5 < logged / measured < 1.5, (logged, measured)


def test_train_refuses_a_dit_run_that_cannot_fit_naming_the_options(folders, shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(train_argv(shapes_data, str(out), folders["zimage"], "--micro_batch_size=16",
                               udp="train_target=transformer memory_limit_gb=0.001"))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("easynlp: error: the estimated peak memory of this run")
    for option in ("gradient_checkpointing=True", "--use_amp", "optimizer=adafactor", "use_ema=False",
                   "memory_check=False"):
        assert option in err, option
    assert not (out / "training_state").exists()


def test_refusal_names_what_fits_for_zimage_turbo_lora(turbo):
    """A LoRA of Z-Image-Turbo at 512² on a CPU without gradient checkpointing does not fit 22 GiB; the refusal names
    gradient checkpointing, with which it does."""
    footprint = families.family_of(turbo).memory_footprint(turbo, train_target="lora", text_length=512, lora_rank=16)
    settings = dataclasses.replace(BASE, resolution=512, use_amp=True, use_ema=False)
    with pytest.raises(UserError) as err:
        memory.check(footprint, settings, limit_gb=22)
    message = str(err.value)
    assert "exceeds the 22.0 GiB available (memory_limit_gb=22)" in message and "\n" not in message
    assert "it fits with gradient_checkpointing=True" in message


def test_zimage_turbo_lora_at_1024_fits_24_gb_on_a_gpu_only_with_checkpointing(turbo):
    footprint = families.family_of(turbo).memory_footprint(turbo, train_target="lora", text_length=512, lora_rank=16)
    assert 6.1e9 < footprint.frozen["transformer"] < 6.2e9 and "text_encoder" not in footprint.frozen
    gpu = dataclasses.replace(BASE, resolution=1024, use_amp=True, use_ema=False, device="cuda")
    assert memory.estimate(footprint, dataclasses.replace(gpu, gradient_checkpointing=True)).peak < 24 * GIB
    assert memory.estimate(footprint, gpu).peak > 24 * GIB
