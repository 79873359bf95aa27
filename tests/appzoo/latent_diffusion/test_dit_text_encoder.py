"""train_text_encoder=True for Z-Image and Qwen-Image (issue 33): the caption encoded in every step as the pipeline
encodes it (the family's ``text_embeddings``: equal to the pipeline's ``encode_prompt``, and differentiable into
exactly the parameters it reaches), no text-embedding cache; the text encoder's weights change, the saved folder's
text encoder is the trained one (predict with it equals diffusers' pipeline loaded from it by hand) and the
validation loss goes down; a run SIGKILLed after a checkpoint resumes exactly; 2 processes train like 1; gradient
checkpointing reaches the encoder; lora_text_encoder and train_text_encoder with a LoRA are refused in one line; the
memory plan counts the encoder as trained."""

import glob
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from easynlp_ldm import cli, memory
from modelzoo import families
from modelzoo.objectives import fixed_noise_flow_loss
from tests.helpers import (
    DIT_FAST_FLAGS,
    dit_makers,
    easynlp_process,
    finished_output,
    free_port,
    kill_after_first_checkpoint,
    largest_difference,
    predicted_image,
    read_rows,
    train_argv,
)

MAKERS = dit_makers()
FAST = DIT_FAST_FLAGS
TRAIN = "train_target=transformer train_text_encoder=True sample_images=0"
CAPTIONS = ["", "一个红色的圆形在白色背景上", "左上角有一个蓝色正方形", "a red circle"]
TEXT_LENGTH = 256  # past the tiny tokenizer's long template: the captions' lengths differ
STEPS, SEED, TOLERANCE = 2, 7, 3  # TOLERANCE: of 255
# The family's own guidance off in both calls (the by-hand pipeline's defaults otherwise differ from predict's).
GUIDANCE = {"zimage": ("scale=0", dict(guidance_scale=0.0)), "qwenimage": ("true_cfg_scale=1", {})}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {name: make(str(root / name)) for name, make in MAKERS.items()}


def _encoder_weights(folder):
    return load_file(glob.glob(os.path.join(folder, "text_encoder", "*.safetensors"))[0])


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_text_embeddings_are_the_pipelines_and_reach_every_parameter_the_family_trains(folders, name):
    model = families.load(folders[name])
    family = families.family_of(model)
    pipe = family.pipeline(model)
    with torch.no_grad():
        if name == "zimage":
            expected, _ = pipe.encode_prompt(list(CAPTIONS), device=model.device, do_classifier_free_guidance=False,
                                             max_sequence_length=TEXT_LENGTH)
        else:  # padded to the longest, with the mask of each prompt's tokens
            padded, mask = pipe.encode_prompt(list(CAPTIONS), device=model.device, max_sequence_length=TEXT_LENGTH)
            assert mask is not None  # lengths differ: padding to drop
            expected = [embed[:int(length)] for embed, length in zip(padded, mask.sum(dim=1))]
    model.text_encoder.requires_grad_(True)
    embeddings = family.text_embeddings(model, list(CAPTIONS), TEXT_LENGTH)
    assert len(embeddings) == len(CAPTIONS) and all(e.requires_grad for e in embeddings)
    for got, want in zip(embeddings, expected):
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert float((got.detach() - want).abs().max()) <= 1e-6
    cached = family.encode_texts(model, list(CAPTIONS), TEXT_LENGTH)  # the cache's path: the same function
    assert all(torch.equal(c, e.detach()) for c, e in zip(cached, embeddings)) and not cached[0].requires_grad
    sum(e.square().sum() for e in embeddings).backward()
    unreached = family.text_encoder_unreached(model)
    reached = {n for n, p in model.text_encoder.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == {n for n, _ in model.text_encoder.named_parameters() if not n.startswith(unreached)}


def _validation_loss(model, run, captions):
    """The fixed-noise validation loss of ``model`` on the run's cached validation latents, each caption encoded by
    ``model``'s own text encoder."""
    [path] = glob.glob(os.path.join(run, "latent_cache", "val-*.pt"))
    moments = torch.stack(torch.load(path, weights_only=True)["moments"])
    family = families.family_of(model)
    return fixed_noise_flow_loss(model, family.encode_texts(model, captions, model.text_max_length), moments)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_the_text_encoder_trains_is_saved_and_the_folder_predicts_as_diffusers_loads_it(folders, shapes_data,
                                                                                          tmp_path, name):
    run = str(tmp_path / "run")
    argv = train_argv(shapes_data, run, folders[name], *FAST, "--epoch_num=6", "--learning_rate=2e-3",
                      udp=f"{TRAIN} caption_dropout=0.2 ema_decay=0.5")
    assert cli.main(argv) == 0
    assert not glob.glob(os.path.join(run, "latent_cache", "text-*.pt"))  # no text-embedding cache
    before, after = families.load(folders[name]), families.load(run)
    family = families.family_of(after)
    unreached = family.text_encoder_unreached(after)
    original, trained = before.text_encoder.state_dict(), after.text_encoder.state_dict()
    assert original.keys() == trained.keys()
    for key in original:  # the reached parameters changed, the others are saved as they were read
        changed = not torch.equal(original[key], trained[key])
        assert changed is not key.startswith(unreached), key
    # the checkpoint's encoder is the one of last/ (both written from memory, EMA applied)
    assert largest_difference(_encoder_weights(run), _encoder_weights(os.path.join(run, "last"))) == 0
    captions = [row[1] for row in read_rows(os.path.join(shapes_data, "T2I_val.tsv"))]
    loss_before, loss_after = _validation_loss(before, run, captions), _validation_loss(after, run, captions)
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)

    from diffusers import DiffusionPipeline

    udp, by_hand = GUIDANCE[name]
    predicted, seed = predicted_image(run, tmp_path, udp, SEED, STEPS)
    pipe = DiffusionPipeline.from_pretrained(run, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("一个红色的圆形", height=32, width=32, num_inference_steps=STEPS, output_type="np",
                    generator=torch.Generator().manual_seed(seed), **by_hand).images[0]
    assert np.abs(predicted - (expected * 255).round().astype(np.int16)).max() <= TOLERANCE
    original_image, _ = predicted_image(folders[name], tmp_path, udp, SEED, STEPS)
    assert np.abs(predicted - original_image).max() > TOLERANCE  # and the images are the trained model's


def _trained_weights(run):
    """last/'s transformer and text encoder, by name."""
    last = os.path.join(run, "last")
    transformer = load_file(os.path.join(last, "transformer", "diffusion_pytorch_model.safetensors"))
    return {**{f"transformer.{k}": v for k, v in transformer.items()},
            **{f"text_encoder.{k}": v for k, v in _encoder_weights(last).items()}}


def test_run_sigkilled_after_a_checkpoint_resumes_exactly(folders, shapes_data, tmp_path):
    common = [*FAST, "--learning_rate=1e-2", "--save_checkpoint_steps=3", "--epoch_num=5"]
    udp = f"{TRAIN} caption_dropout=0.3 ema_decay=0.9"
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    uninterrupted = easynlp_process(train_argv(shapes_data, straight, folders["zimage"], *common, udp=udp))
    process = easynlp_process(train_argv(shapes_data, killed, folders["zimage"], *common, udp=udp))
    saved_step = kill_after_first_checkpoint(process, killed, timeout=300)
    assert saved_step < 20, "the run finished before it could be killed"
    output = finished_output(uninterrupted)
    assert "text encoder kept in memory: it trains" in output and "captions encoded once" not in output
    output = finished_output(easynlp_process(train_argv(shapes_data, killed, folders["zimage"], *common, udp=udp)))
    assert f"resumed from {killed}/training_state at step {saved_step}" in output
    a, b = _trained_weights(straight), _trained_weights(killed)
    assert largest_difference(a, b) <= 1e-5
    source = _encoder_weights(folders["zimage"])
    assert largest_difference({k: v for k, v in a.items() if k.startswith("text_encoder.")},
                               {f"text_encoder.{k}": v for k, v in source.items()}) > 0


def test_two_processes_of_4_train_like_one_of_8(folders, shapes_data, tmp_path):
    common = ["--warmup_proportion=0", "--max_grad_norm=0", "--learning_rate=1e-3", "--epoch_num=1"]
    udp = f"{TRAIN} caption_dropout=0.3 use_ema=False"
    runs = {"one": ["--micro_batch_size=8"], "two": ["--micro_batch_size=4", "--worker_gpu=2",
                                                     f"--master_port={free_port()}"]}
    started = [easynlp_process(train_argv(shapes_data, str(tmp_path / name), folders["qwenimage"], *extra, *common,
                                          udp=udp)) for name, extra in runs.items()]
    for process in started:
        finished_output(process)
    one, two = (_encoder_weights(os.path.join(tmp_path, name, "last")) for name in runs)
    assert largest_difference(one, two) <= 1e-4
    assert largest_difference(one, _encoder_weights(folders["qwenimage"])) > 0  # it trained


def test_gradient_checkpointing_reaches_the_text_encoder_and_trains_the_same(folders, shapes_data, tmp_path,
                                                                             monkeypatch):
    from appzoo.latent_diffusion import train

    built, build = [], train.build_task
    monkeypatch.setattr(train, "build_task", lambda *args, **kwargs: built.append(build(*args, **kwargs)) or built[-1])
    weights = {}
    for checkpointing in (False, True):
        run = str(tmp_path / f"checkpointing{checkpointing}")
        assert cli.main(train_argv(shapes_data, run, folders["zimage"], *FAST, "--epoch_num=1", "--learning_rate=1e-3",
                                   udp=f"{TRAIN} use_ema=False gradient_checkpointing={checkpointing}")) == 0
        assert built[-1].model.text_encoder.is_activation_checkpointing is checkpointing
        weights[checkpointing] = _trained_weights(run)
    assert largest_difference(weights[False], weights[True]) <= 1e-5


@pytest.mark.parametrize("udp, message", [
    ("train_target=lora lora_text_encoder=True", "lora_text_encoder=True: diffusers' zimage pipelines load LoRAs of "
                                                 "the transformer only"),
    ("train_target=lora train_text_encoder=True", "train_text_encoder=True trains the whole text encoder beside the "
                                                  "whole transformer: use train_target=transformer")])
def test_lora_of_the_text_encoder_is_refused_in_one_line(folders, shapes_data, tmp_path, capsys, udp, message):
    argv = train_argv(shapes_data, str(tmp_path / "run"), folders["zimage"], *FAST, udp=f"{udp} sample_images=0")
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("easynlp: error: ") and message in error


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_the_memory_plan_counts_the_text_encoder_as_trained(folders, name):
    model = families.load(folders[name])
    family = families.family_of(model)
    frozen = family.memory_footprint(model, train_target="transformer", text_length=TEXT_LENGTH)
    trained = family.memory_footprint(model, train_target="transformer", text_length=TEXT_LENGTH,
                                      train_text_encoder=True)
    unreached = family.text_encoder_unreached(model)
    reached = [tuple(p.shape) for n, p in model.text_encoder.named_parameters() if not n.startswith(unreached)]
    assert sorted(trained.trained["text_encoder"]) == sorted(reached) and "text_encoder" not in frozen.trained
    assert frozen.encode_only_bytes > 0 and trained.encode_only_bytes == 0  # it stays: weights at the step too
    settings = memory.MemorySettings(micro_batch_size=4, resolution=32, gradient_checkpointing=False, use_amp=False,
                                     optimizer="adamw", use_ema=True, ema_device="", save_optimizer=True, device="cpu")
    with_encoder, without = memory.estimate(trained, settings), memory.estimate(frozen, settings)
    assert with_encoder.parts["text_activations"] > 0 and without.parts["text_activations"] == 0
    for part in ("gradients", "optimizer"):
        assert with_encoder.parts[part] > without.parts[part]
    assert with_encoder.host["step"] > without.host["step"]
