"""Fine-tuning Z-Image and Qwen-Image (issue 32): train_target=transformer lowers the flow-matching validation loss
and saves a diffusers folder that loads as the same family; train_target=lora writes pytorch_lora_weights.safetensors
that diffusers' pipe.load_lora_weights takes as it is, giving predict's lora= image; captions are encoded once (the
text-embedding cache); an interrupted run resumed (in-process, or SIGKILLed and the identical command run again) ends
with the uninterrupted run's weights; 2 processes of micro-batch 4 train like 1 of 8; gradient_checkpointing=True
recomputes the transformer's blocks and trains as without it."""

import glob
import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from appzoo.latent_diffusion.loading import load_model
from easynlp_ldm import cli
from modelzoo import families
from modelzoo.lora import LORA_FILE
from modelzoo.objectives import fixed_noise_flow_loss
from tests.helpers import (
    DIT_FAST_FLAGS,
    dit_makers,
    easynlp_process,
    finished_output,
    free_port,
    interrupt_after_first_checkpoint,
    kill_after_first_checkpoint,
    largest_difference,
    predicted_image,
    read_rows,
    train_argv,
)

MAKERS = dit_makers()
FAST = DIT_FAST_FLAGS
STEPS, SEED = 2, 7
TOLERANCE = 3  # of 255


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {name: make(str(root / name)) for name, make in MAKERS.items()}


def _cached(run, name):
    """What the run cached: the validation latents' moments and the text embeddings of its captions."""
    [path] = glob.glob(os.path.join(run, "latent_cache", f"{name}-*.pt"))
    return torch.load(path, weights_only=True)


def _validation_loss(model, run, captions):
    """The run's validation loss of ``model`` (fixed noise) on the validation table's cached latents and captions."""
    texts = _cached(run, "text")
    by_caption = dict(zip(texts["captions"], texts["embeddings"]))
    moments = torch.stack(_cached(run, "val")["moments"])
    return fixed_noise_flow_loss(model, [by_caption[caption] for caption in captions], moments)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_full_fine_tuning_lowers_validation_loss_and_saves_a_folder_of_the_family(folders, shapes_data, tmp_path,
                                                                                   name, caplog):
    caplog.set_level(logging.INFO)
    run = str(tmp_path / "run")
    argv = train_argv(shapes_data, run, folders[name], *FAST, "--epoch_num=6", "--learning_rate=2e-3",
                      udp="train_target=transformer caption_dropout=0 use_ema=False sample_images=0")
    assert cli.main(argv) == 0
    assert "captions encoded once by the text encoder" in caplog.text
    captions = [row[1] for row in read_rows(os.path.join(shapes_data, "T2I_val.tsv"))]
    before, after = families.load(folders[name]), families.load(run)
    assert after.family == name and type(after.transformer) is type(before.transformer)
    for part in ("vae", "text_encoder"):  # frozen: saved as they were
        for key, value in getattr(before, part).state_dict().items():
            assert torch.equal(getattr(after, part).state_dict()[key], value), (part, key)
    loss_before, loss_after = _validation_loss(before, run, captions), _validation_loss(after, run, captions)
    assert loss_after < 0.9 * loss_before, (loss_before, loss_after)


def _pipeline(folder):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# The family's own guidance off in both calls: the images then differ by the adapter alone.
GUIDANCE = {"zimage": ("scale=0", dict(guidance_scale=0.0)), "qwenimage": ("true_cfg_scale=1", {})}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_lora_loads_in_diffusers_as_it_is_and_gives_predicts_lora_image(folders, shapes_data, tmp_path, name):
    run = str(tmp_path / "lora")
    argv = train_argv(shapes_data, run, folders[name], *FAST, "--epoch_num=4", "--learning_rate=5e-2",
                      udp="train_target=lora lora_rank=4 caption_dropout=0 use_ema=False sample_images=0")
    assert cli.main(argv) == 0
    state = load_file(os.path.join(run, LORA_FILE))
    assert state and all(key.startswith("transformer.") for key in state)
    udp, by_hand = GUIDANCE[name]
    plain, seed = predicted_image(folders[name], tmp_path, udp, SEED, STEPS)
    adapted, seed_again = predicted_image(folders[name], tmp_path, f"{udp} lora={run}", SEED, STEPS)
    assert seed == seed_again
    assert np.abs(adapted - plain).max() > 10  # it learnt something

    pipe = _pipeline(folders[name])
    pipe.load_lora_weights(run)  # the folder as the run left it: diffusers finds pytorch_lora_weights.safetensors
    expected = pipe("一个红色的圆形", height=32, width=32, num_inference_steps=STEPS, output_type="np",
                    generator=torch.Generator().manual_seed(seed), **by_hand).images[0]
    expected = (expected * 255).round().astype(np.int16)
    assert np.abs(adapted - expected).max() <= TOLERANCE


def test_interrupted_run_resumed_ends_with_the_uninterrupted_runs_weights(folders, shapes_data, tmp_path,
                                                                         monkeypatch):
    """Killed after its first checkpoint, then the identical command: the transformer of a run never stopped (EMA,
    optimiser state, the per-sample draws and the caches read back from disk)."""
    common = [*FAST, "--learning_rate=1e-3", "--save_checkpoint_steps=3", "--epoch_num=2"]
    udp = "train_target=transformer caption_dropout=0.3 ema_decay=0.9 weighting_scheme=logit_normal sample_images=0"
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert cli.main(train_argv(shapes_data, straight, folders["zimage"], *common, udp=udp)) == 0
    interrupt_after_first_checkpoint(monkeypatch, train_argv(shapes_data, resumed, folders["zimage"], *common,
                                                             udp=udp))
    assert cli.main(train_argv(shapes_data, resumed, folders["zimage"], *common, udp=udp)) == 0
    a, b = (load_file(os.path.join(run, "last", "transformer", "diffusion_pytorch_model.safetensors"))
            for run in (straight, resumed))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert max(float((a[k] - load_model(folders["zimage"]).transformer.state_dict()[k]).abs().max())
               for k in a) > 0


def test_text_embedding_cache_is_read_back_and_sd_settings_are_refused(folders, shapes_data, tmp_path, caplog,
                                                                       capsys):
    caplog.set_level(logging.INFO)
    run = str(tmp_path / "run")
    argv = train_argv(shapes_data, run, folders["qwenimage"], *FAST, "--epoch_num=1",
                      udp="train_target=lora sample_images=0")
    assert cli.main(argv) == 0
    saved = _cached(run, "text")
    assert saved["captions"][0] == "" and len(saved["captions"]) == len(set(saved["captions"]))
    caplog.clear()
    assert cli.main(train_argv(shapes_data, run, folders["qwenimage"], *FAST, "--epoch_num=1",
                               udp="train_target=lora sample_images=0 overwrite_checkpoint_dir=True")) == 0
    assert "(none encoded)" in caplog.text and "captions encoded once" not in caplog.text
    assert cli.main(train_argv(shapes_data, str(tmp_path / "snr"), folders["zimage"], *FAST,
                               udp="train_target=transformer snr_gamma=5")) == 2
    assert "SD-1.x's training settings do not apply to zimage models" in capsys.readouterr().err


# What each train_target leaves in last/: the adapter, or the transformer of a diffusers folder (EMA on: its state too).
SIGKILLED = {"lora": ("train_target=lora lora_rank=2 use_ema=False", LORA_FILE),
             "transformer": ("train_target=transformer ema_decay=0.9",
                             os.path.join("transformer", "diffusion_pytorch_model.safetensors"))}


@pytest.mark.parametrize("target", sorted(SIGKILLED))
def test_run_sigkilled_after_a_checkpoint_resumes_by_the_identical_command(folders, shapes_data, tmp_path, target):
    common = [*FAST, "--learning_rate=1e-2", "--save_checkpoint_steps=3", "--epoch_num=5"]
    udp, saved = SIGKILLED[target]
    udp += " caption_dropout=0.3 sample_images=0"
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    uninterrupted = easynlp_process(train_argv(shapes_data, straight, folders["zimage"], *common, udp=udp))
    process = easynlp_process(train_argv(shapes_data, killed, folders["zimage"], *common, udp=udp))
    saved_step = kill_after_first_checkpoint(process, killed, timeout=300)
    assert saved_step < 20, "the run finished before it could be killed"
    assert "captions encoded once" in finished_output(uninterrupted)
    output = finished_output(easynlp_process(train_argv(shapes_data, killed, folders["zimage"], *common, udp=udp)))
    assert f"resumed from {killed}/training_state at step {saved_step}" in output
    assert "captions encoded once" not in output  # the text-embedding cache read back
    assert "text encoder released after caching" in output  # and the encoder gone before the first step
    a, b = (load_file(os.path.join(run, "last", saved)) for run in (straight, killed))
    assert largest_difference(a, b) <= 1e-5


def test_two_processes_of_4_train_like_one_of_8(folders, shapes_data, tmp_path):
    common = ["--warmup_proportion=0", "--max_grad_norm=0", "--learning_rate=1e-3", "--epoch_num=1"]
    udp = "train_target=transformer caption_dropout=0.3 use_ema=False sample_images=0"
    runs = {"one": ["--micro_batch_size=8"], "two": ["--micro_batch_size=4", "--worker_gpu=2",
                                                     f"--master_port={free_port()}"]}
    started = [easynlp_process(train_argv(shapes_data, str(tmp_path / name), folders["zimage"], *extra, *common,
                                          udp=udp)) for name, extra in runs.items()]
    for process in started:
        finished_output(process)
    a, b = (load_file(os.path.join(tmp_path, name, "last", "transformer", "diffusion_pytorch_model.safetensors"))
            for name in runs)
    assert largest_difference(a, b) <= 1e-4
    assert largest_difference(a, load_model(folders["zimage"]).transformer.state_dict()) > 0  # it trained


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_gradient_checkpointing_recomputes_the_blocks_and_trains_the_same(folders, shapes_data, tmp_path, name,
                                                                           monkeypatch):
    import torch.utils.checkpoint

    checkpoint, calls = torch.utils.checkpoint.checkpoint, []

    def counted(*args, **kwargs):
        calls.append(1)
        return checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted)
    runs = {}
    for checkpointing in (False, True):
        run = str(tmp_path / f"checkpointing{checkpointing}")
        udp = f"train_target=transformer use_ema=False sample_images=0 gradient_checkpointing={checkpointing}"
        assert cli.main(train_argv(shapes_data, run, folders[name], *FAST, "--epoch_num=1", "--learning_rate=1e-3",
                                   udp=udp)) == 0
        assert bool(calls) is checkpointing
        runs[checkpointing] = load_file(glob.glob(os.path.join(run, "last", "transformer", "*.safetensors"))[0])
    assert largest_difference(runs[False], runs[True]) <= 1e-5
