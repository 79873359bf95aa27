"""The memory plan of latent_diffusion (appzoo/latent_diffusion/memory_plan.py, the SD-1.x family's coefficients in
modelzoo/families/sd_memory.py, over easynlp_ldm/memory.py): the estimate's response to each setting, on SD-1.5's
architecture built on the meta device (shapes only, no memory), the options it proposes, and ``--mode=train`` refusing a
run that cannot fit with a one-line error (exit 2) — or only
warning with memory_check=False."""

import dataclasses
import os

import pytest
import torch

from easynlp_ldm import cli, memory
from modelzoo.families import sd_memory
from tests.helpers import ROOT, train_argv

GIB = memory.GIB


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    from modelzoo.presets import build_from_preset
    from modelzoo.tiny import write_vocab

    vocab = str(tmp_path_factory.mktemp("vocab") / "vocab.txt")
    write_vocab(vocab)
    with torch.device("meta"):
        model = build_from_preset(os.path.join(ROOT, "configs", "sd15_arch.json"), vocab)
    return sd_memory.latent_diffusion_footprint(model)


BASE = memory.MemorySettings(micro_batch_size=4, resolution=512, gradient_checkpointing=False, use_amp=False,
                             optimizer="adamw", use_ema=True, ema_device="", save_optimizer=True, device="cpu")


def peak(footprint, **changes):
    return memory.estimate(footprint, dataclasses.replace(BASE, **changes)).peak


def test_footprint_counts_sd15_parameters(sd15):
    assert 855e6 < sd15.trained_count < 865e6  # the UNet
    assert 1025e6 < sd15.trained_count + sd15.frozen_count < 1035e6  # + CLIP-L-sized text encoder + VAE


def test_estimate_grows_with_micro_batch_and_resolution(sd15):
    assert peak(sd15, micro_batch_size=1) < peak(sd15, micro_batch_size=2) < peak(sd15, micro_batch_size=4)
    assert peak(sd15, resolution=256) < peak(sd15, resolution=384) < peak(sd15, resolution=512)
    # activations scale with the micro-batch and the feature maps (∝ pixels)
    parts = {b: memory.estimate(sd15, dataclasses.replace(BASE, micro_batch_size=b)).parts for b in (1, 2)}
    assert parts[2]["activations"] == pytest.approx(2 * parts[1]["activations"], rel=1e-6)


def test_estimate_shrinks_with_each_memory_option(sd15):
    default = peak(sd15)
    for option in (dict(gradient_checkpointing=True), dict(use_amp=True), dict(optimizer="adafactor"),
                   dict(use_ema=False)):
        assert peak(sd15, **option) < default, option
    # together: the memory recipe, at micro-batch 1 within a 16 GB GPU's budget
    recipe = dict(micro_batch_size=1, gradient_checkpointing=True, use_amp=True, optimizer="adafactor", use_ema=False)
    assert peak(sd15, **recipe) < 16e9 < peak(sd15, micro_batch_size=1)
    # on a GPU the EMA in RAM frees the GPU's memory and costs RAM
    gpu = memory.estimate(sd15, dataclasses.replace(BASE, device="cuda"))
    ema_host = memory.estimate(sd15, dataclasses.replace(BASE, device="cuda", ema_device="cpu"))
    assert ema_host.peak == gpu.peak - gpu.parts["ema"] and ema_host.host["step"] > gpu.host["step"]
    # save_optimizer=False is a disk option: the state is saved from where it lives either way
    assert peak(sd15, save_optimizer=False) == default


def test_fitting_options_name_what_fits(sd15):
    settings = dataclasses.replace(BASE, micro_batch_size=16)
    options, fitted = memory.fitting_options(sd15, settings, int(20 * GIB), effective_batch=16)
    assert fitted is not None and fitted.peak <= 20 * GIB
    assert options[0].startswith("--micro_batch_size=") and "--gradient_accumulation_steps=" in options[0]
    options, fitted = memory.fitting_options(sd15, settings, int(13 * GIB), effective_batch=16)
    assert fitted is not None and fitted.peak <= 13 * GIB
    assert {"gradient_checkpointing=True", "optimizer=adafactor"} <= set(options)
    options, fitted = memory.fitting_options(sd15, settings, int(2 * GIB))
    assert fitted is None


def test_train_refuses_what_cannot_fit_with_one_line_and_exit_2(tiny_model_dir, shapes_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(train_argv(shapes_data, str(out), tiny_model_dir, "--micro_batch_size=16",
                               udp="memory_limit_gb=0.001"))
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("easynlp: error: the estimated peak memory of this run")
    assert "exceeds the 0.0 GiB available (memory_limit_gb=0.001)" in err
    for option in ("gradient_checkpointing=True", "--use_amp", "optimizer=adafactor", "use_ema=False",
                   "memory_check=False"):
        assert option in err, option
    assert not (out / "training_state").exists()  # stopped before any work


def test_refusal_names_the_options_that_fit_with_a_margin(sd15):
    # the seed's micro-batch 16 at 512² on SD-1.5's size within 15 GiB
    from easynlp_ldm.errors import UserError

    settings = dataclasses.replace(BASE, micro_batch_size=16)
    with pytest.raises(UserError) as err:
        memory.check(sd15, settings, limit_gb=15, effective_batch=16)
    message = str(err.value)
    assert "exceeds the 15.0 GiB available (memory_limit_gb=15)" in message and "\n" not in message
    options, fitted = memory.fitting_options(sd15, settings, int(0.9 * 15 * GIB), effective_batch=16)
    assert fitted.peak <= 0.9 * 15 * GIB
    assert f"it fits with {', '.join(options)} (estimated {fitted.peak / GIB:.1f} GiB" in message
    assert "gradient_checkpointing=True" in options
    if options[0].startswith("--micro_batch_size="):  # a smaller micro-batch keeps the batch of 16 by accumulation
        micro, accumulation = (int(word.split("=")[1]) for word in options[0].split())
        assert micro < 16 and micro * accumulation == 16
    # with less memory a smaller micro-batch is part of the answer
    options, fitted = memory.fitting_options(sd15, settings, int(0.9 * 12 * GIB), effective_batch=16)
    assert fitted is not None and options[0].startswith("--micro_batch_size=")
    assert "VAE encode 13.00" in message  # 16 images at 512² encoded at once: what the issue measured (13.6 GB)
    # memory_check=False: the same estimate, no refusal
    assert memory.check(sd15, settings, limit_gb=15, enforce=False).peak > 15 * GIB


def test_memory_recipe_trains_saves_without_optimiser_and_resumes(tiny_model_dir, shapes_data, tmp_path, caplog):
    """memory_check=False only warns; Adafactor + checkpointing + AMP trains (validation loss falls); the checkpoint
    has no optimiser state and no second copy of the weights; resume restarts the optimiser with a warning."""
    import re

    out = tmp_path / "run"
    recipe = ("memory_limit_gb=0.001 memory_check=False sample_images=0 caption_dropout=0 optimizer=adafactor "
              "save_optimizer=False use_ema=False gradient_checkpointing=True")
    common = ("--micro_batch_size=16", "--learning_rate=2e-3", "--warmup_proportion=0", "--save_checkpoint_steps=2",
              "--use_amp")
    with caplog.at_level("INFO"):
        assert cli.main(train_argv(shapes_data, str(out), tiny_model_dir, *common, "--epoch_num=2", udp=recipe)) == 0
    assert "memory_check=False: the estimated peak memory of this run" in caplog.text
    losses = [float(v) for v in re.findall(r"step \d+: validation loss ([\d.]+)", caplog.text)]
    assert len(losses) == 2 and losses[-1] < losses[0]
    state = out / "training_state"
    saved = torch.load(state / "state.pt", weights_only=True)
    assert saved["optimizer"] is None and saved["weights"] is None and saved["linked"] == "weights"
    assert os.path.samefile(state / "model_weights.bin", out / "last" / "pytorch_model.bin")
    model_bytes = sum(f.stat().st_size for f in (out / "last").iterdir())
    assert (state / "state.pt").stat().st_size < 0.1 * model_bytes  # checkpoint ≈ the model's size
    caplog.clear()
    with caplog.at_level("INFO"):
        assert cli.main(train_argv(shapes_data, str(out), tiny_model_dir, *common, "--epoch_num=3",
                                   f"--resume_from_checkpoint={out}", udp=recipe)) == 0
    assert "saved without the optimiser state (save_optimizer=False): the optimiser restarts at step 4" in caplog.text
    assert "step 6/6" in caplog.text


def test_loading_counts_one_copy_of_the_weights_in_ram(sd15):
    """The built modules' weights are replaced by the memory-mapped file's (modelzoo/ldm.py): one copy, not two."""
    small = memory.estimate(sd15, dataclasses.replace(BASE, micro_batch_size=1, gradient_checkpointing=True,
                                                      use_amp=True, optimizer="adafactor", use_ema=False))
    assert small.parts["weights"] <= small.host["load"] < 1.5 * small.parts["weights"]
