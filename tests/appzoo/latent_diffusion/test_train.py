import base64
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from easynlp_ldm import cli
from modelzoo.families import sd
from tests.helpers import (
    EASYNLP_DATA,
    ROOT,
    SEED_TRAIN,
    decode,
    easynlp_checkpoint,
    kill_after_first_checkpoint,
    predict_argv,
    read_rows,
    train_argv,
)
from tests.helpers import saved_weights as weights


def test_seed_train_command_as_published_on_diffusers_layout(tiny_model_dir, shapes_data, tmp_path, monkeypatch,
                                                            caplog):
    # The tutorial's command verbatim, run where alibaba-pai/pai-diffusion-general-large-zh is a local folder.
    shutil.copy(os.path.join(shapes_data, "T2I_train.tsv"), tmp_path)
    shutil.copy(os.path.join(shapes_data, "T2I_val.tsv"), tmp_path)
    os.symlink(os.path.dirname(tiny_model_dir), tmp_path / "alibaba-pai")
    monkeypatch.chdir(tmp_path)
    argv = SEED_TRAIN  # the tutorial command verbatim (shared with the CLI tests)
    assert cli.main(argv) == 0
    out = tmp_path / "finetuned_model"
    for name in ("config.json", "pytorch_model.bin", "vocab.txt"):
        assert (out / name).is_file()
    # Self-contained: loads from the folder alone (moved away from everything else).
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("log", "last", "training_state"))
    model = sd.load(str(moved))
    assert model.text_max_length == 32  # 288 clamped to the encoder's 32 positions
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "easynlp-ldm" and config["image_size"] == 32
    assert config["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert os.listdir(out / "log")  # TensorBoard
    # The tutorial packages RRDB_ESRGAN_x4.pth next; this model has none, and the end of training says so.
    assert "has no RRDB_ESRGAN_x4.pth: EasyNLP's packaging command" in caplog.text


def test_overfit_loss_falls_frozen_parts_unchanged_ema_saved(tiny_model_dir, shapes_data, tmp_path):
    out = str(tmp_path / "run")
    argv = train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=16", "--epoch_num=15",
                      "--learning_rate=1e-3", "--warmup_proportion=0", "--save_checkpoint_steps=10",
                      udp="caption_dropout=0 ema_decay=0.9")
    assert cli.main(argv) == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "log"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert {"train/lr", "train/grad_norm", "train/images_per_sec", "val/loss"} <= set(events.Tags()["scalars"])
    assert events.Tags()["images"]  # sample images at validation

    source = sd.load(tiny_model_dir)
    saved = weights(os.path.join(out, "last"))
    for key, value in source.text_encoder.state_dict().items():
        assert torch.equal(saved[f"text_encoder.{key}"], value), key
    for key, value in source.vae.state_dict().items():
        assert torch.equal(saved[f"vae.{key}"], value), key
    raw = torch.load(os.path.join(out, "training_state", "state.pt"), weights_only=True)["weights"]
    diffs = [float((saved[k] - v).abs().max()) for k, v in raw.items()]
    assert max(diffs) > 0  # the EMA is not the raw weights ...
    ema = torch.load(os.path.join(out, "training_state", "state.pt"), weights_only=True)["ema"]["shadow_params"]
    for (key, _), shadow in zip(raw.items(), ema):
        assert torch.equal(saved[key], shadow)  # ... and it is what was saved for inference
    changed = [k for k, v in source.unet.state_dict().items() if not torch.equal(saved[f"unet.{k}"], v)]
    assert changed


def test_accumulation_matches_bigger_micro_batches(tiny_model_dir, shapes_data, tmp_path):
    common = ("--epoch_num=2", "--learning_rate=1e-3", "--max_grad_norm=0")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main(train_argv(shapes_data, a, tiny_model_dir, "--micro_batch_size=8", *common,
                               udp="use_ema=False")) == 0
    assert cli.main(train_argv(shapes_data, b, tiny_model_dir, "--micro_batch_size=4",
                               "--gradient_accumulation_steps=2", *common, udp="use_ema=False")) == 0
    wa, wb = weights(os.path.join(a, "last")), weights(os.path.join(b, "last"))
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def _run(argv, **kwargs):
    """The command in a process of one thread (the same sums in every run; two such run side by side on 2 cores)."""
    env = dict(os.environ, PYTHONPATH=ROOT, EASYNLP_PROGRESS="0", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "easynlp_ldm.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_sigkill_after_first_checkpoint_then_the_identical_command_resumes(tiny_model_dir, shapes_data, tmp_path):
    common = ("--micro_batch_size=4", "--epoch_num=5", "--learning_rate=5e-4", "--save_checkpoint_steps=4")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    uninterrupted = _run(train_argv(shapes_data, full, tiny_model_dir, *common))
    process = _run(train_argv(shapes_data, killed, tiny_model_dir, *common))
    saved_step = kill_after_first_checkpoint(process, killed, timeout=120)
    assert saved_step < 40, "the run finished before it could be killed"
    uninterrupted.communicate()
    assert uninterrupted.returncode == 0
    sd.load(killed)  # the last complete checkpoint loads
    resumed = _run(train_argv(shapes_data, killed, tiny_model_dir, *common))  # the same command, nothing added
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert f"resuming the interrupted run in {killed} from its last checkpoint (step {saved_step})" in output
    assert f"resumed from {killed}/training_state at step {saved_step}" in output
    assert "latents of its 32 images read from" in output and "images encoded" not in output  # none re-encoded
    wf, wk = weights(os.path.join(full, "last")), weights(os.path.join(killed, "last"))
    assert max(float((wf[k] - wk[k]).abs().max()) for k in wf) <= 1e-5
    # TensorBoard: one point per step, the killed run's points after its checkpoint replaced by the resumed run's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(killed, "log"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert sorted(steps) == list(range(1, 41)), steps
    # and run again once finished: complete, nothing done
    again = _run(train_argv(shapes_data, killed, tiny_model_dir, *common))
    output = again.communicate()[0]
    assert again.returncode == 0 and "holds this run, complete (40 steps): nothing to do" in output, output


def test_existing_run_resumes_completes_or_names_the_choices(tiny_model_dir, shapes_data, tmp_path, capsys, caplog,
                                                             monkeypatch):
    from appzoo.latent_diffusion import data

    caplog.set_level("INFO")
    out = str(tmp_path / "run")
    argv = train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=16", "--epoch_num=1")
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0 and "complete (2 steps): nothing to do" in caplog.text
    # EasyNLP's reset_model_state_flag concerns the saved keys' prefix: the same run, complete
    assert cli.main([*argv[:-1], argv[-1] + " reset_model_state_flag=True"]) == 0
    changed = train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=16", "--epoch_num=2")
    assert cli.main(changed) == 2
    err = capsys.readouterr().err
    assert "already holds a run with other settings (epoch_num: 1.0 → 2.0)" in err
    assert f"--resume_from_checkpoint={out}" in err and "overwrite_checkpoint_dir=True" in err
    assert "another folder" in err
    encoded = []
    original = data.LatentCache.add
    monkeypatch.setattr(data.LatentCache, "add", lambda self, i, image: (encoded.append(i), original(self, i, image)))
    changed[-1] += " overwrite_checkpoint_dir=True"
    assert cli.main(changed) == 0
    assert "step 4/4" in caplog.text and not encoded  # started over; the cached latents still served
    assert cli.main(train_argv(shapes_data, str(tmp_path / "new"), tiny_model_dir,
                               f"--resume_from_checkpoint={tmp_path / 'nothing'}")) == 2
    assert "no training state there" in capsys.readouterr().err


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tiny_model_dir, shapes_data, tmp_path, capsys,
                                                           monkeypatch):
    from appzoo.latent_diffusion import train_tasks as train_module

    out = str(tmp_path / "run")
    original = train_module.DiffusionTrainTask.loss
    calls = {"n": 0}

    def poisoned(self, batch):
        calls["n"] += 1
        loss = original(self, batch)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(train_module.DiffusionTrainTask, "loss", poisoned)
    argv = train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=8", "--epoch_num=3",
                      "--save_checkpoint_steps=2")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "loss is nan at step 5" in err and "without saving" in err
    state = json.load(open(os.path.join(out, "training_state", "trainer_meta.json")))
    assert state["step"] == 4
    sd.load(out)


def test_full_disk_is_a_clear_error(tiny_model_dir, shapes_data, tmp_path, capsys, monkeypatch):
    import errno

    from modelzoo import ldm

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ldm, "atomic_torch_save", full)
    assert cli.main(train_argv(shapes_data, str(tmp_path / "run"), tiny_model_dir, "--micro_batch_size=16",
                               "--epoch_num=1")) == 2
    assert "disk full while saving the checkpoint at step 2" in capsys.readouterr().err


def test_uncached_path_with_workers_and_text_encoder_training_and_extras(tiny_model_dir, shapes_data, tmp_path):
    out = str(tmp_path / "run")
    argv = train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=8", "--epoch_num=1", "--use_amp",
                      "--data_threads=2", "--save_all_checkpoints", "--save_checkpoint_steps=2",
                      "--optimizer_type=Adam",
                      udp="random_crop=True random_flip=True train_text_encoder=True snr_gamma=5 noise_offset=0.05 "
                          "gradient_checkpointing=True resolution=24")
    assert cli.main(argv) == 0
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-2", "checkpoint-4"]
    source = sd.load(tiny_model_dir)
    saved = weights(out)
    assert any(not torch.equal(saved[f"text_encoder.{k}"], v) for k, v in source.text_encoder.state_dict().items())


@pytest.mark.parametrize("amp", [(), ("--use_amp",)], ids=["fp32", "amp"])
def test_cached_latents_train_like_uncached(tiny_model_dir, shapes_data, tmp_path, amp, monkeypatch):
    # with --use_amp the cache encodes under the same autocast as an uncached step does (bf16 autocast even where
    # this CPU would train in fp32 for lack of native bf16)
    monkeypatch.setattr("modelzoo.optimize.cpu_supports_bf16", lambda: True)
    common = ("--micro_batch_size=8", "--epoch_num=1", "--learning_rate=1e-3", *amp)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert cli.main(train_argv(shapes_data, a, tiny_model_dir, *common, udp="cache_latents=True")) == 0
    assert cli.main(train_argv(shapes_data, b, tiny_model_dir, *common, udp="cache_latents=False")) == 0
    wa, wb = weights(a), weights(b)
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-4


def test_bad_training_rows_all_reported_in_one_run_then_skipped(tiny_model_dir, shapes_data, tmp_path, capsys,
                                                                 monkeypatch, caplog):
    # Bad rows on lines 3, 7 and 11, each for another reason: one run names all three (the file lists them), and
    # stops before any image is encoded past the first bad row; skip_bad_rows=True trains on the rest and lists them.
    from appzoo.latent_diffusion import data

    table = tmp_path / "train.tsv"
    lines = open(os.path.join(shapes_data, "T2I_train.tsv"), encoding="utf-8").read().splitlines()[:20]
    lines[2] = "bad\t坏行\tnot-base64!!"
    lines[6] = "bad\tonly two columns"
    lines[10] = "bad\t空白\t" + base64.b64encode(b"GIF89a not really").decode()
    table.write_text("\n".join(lines) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    argv = ["--mode=train", f"--tables={table}", "--input_schema=idx:str:1,text:str:1,imgbase64:str:1",
            "--first_sequence=text", "--second_sequence=imgbase64", f"--checkpoint_dir={run}",
            "--micro_batch_size=16", "--epoch_num=1", f"--user_defined_parameters=pretrain_model_name_or_path="
            f"{tiny_model_dir}"]
    encoded = []
    original = data.LatentCache.add
    monkeypatch.setattr(data.LatentCache, "add", lambda self, i, image: (encoded.append(i), original(self, i, image)))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"the first {table}, line 3: undecodable base64" in err
    for line, reason in ((3, "undecodable base64"), (7, "wrong column count"), (11, "not an image")):
        assert f"bad row: {table}, line {line}: {reason}" in caplog.text  # on screen, one line each
    assert "3 bad rows" in err and str(run / "bad_rows.tsv") in err
    listed = [row.split("\t")[:3] for row in (run / "bad_rows.tsv").read_text().splitlines()[1:]]
    assert [(int(line), reason) for _, line, reason in listed] == [
        (3, "undecodable base64"), (7, "wrong column count"), (11, "not an image")]
    assert len(encoded) == 2  # lines 1 and 2 only: nothing is encoded once the run is known to stop
    assert not (run / "training_state").exists()
    argv[-1] += " skip_bad_rows=True"
    assert cli.main(argv) == 0
    assert "skipped 3 bad rows" in caplog.text
    assert len((run / "bad_rows.tsv").read_text().splitlines()) == 4


def test_easynlp_training_keys_map_onto_ours(caplog):
    """do_eval=False drops the validation table; not_use_gradient_checkpoint is gradient_checkpointing inverted;
    size is resolution; text_len and img_len parse (text_len is applied where the text length is chosen)."""
    from appzoo.latent_diffusion.params import PARAMS
    from appzoo.latent_diffusion.settings import TrainingSettings
    from easynlp_ldm.args import parse_user_defined_parameters
    from easynlp_ldm.errors import UserError

    def keys(text):
        return parse_user_defined_parameters(text, PARAMS, "train")

    tables = ["train.tsv", "val.tsv"]
    params, notes = keys("size=256 text_len=32 img_len=256 do_eval=True")
    assert params["resolution"] == 256 and params["text_len"] == 32
    assert len(notes) == 1 and notes[0].startswith("user-defined parameter img_len is accepted and has no effect here")
    mapped = TrainingSettings.from_params(params, tables)
    assert mapped.tables_read(tables) == ["train.tsv", "val.tsv"] and mapped.gradient_checkpointing is False
    assert mapped.resolution == 256 and mapped.text_len == 32
    dropped = TrainingSettings.from_params(keys("do_eval=False")[0], tables)
    with caplog.at_level("WARNING"):
        dropped.log_notes(logging.getLogger("easynlp.train"))
    assert dropped.tables_read(tables) == ["train.tsv"]
    assert "do_eval=False: no validation; val.tsv is not read" in caplog.text
    assert TrainingSettings.from_params(keys("not_use_gradient_checkpoint=False")[0], tables).gradient_checkpointing
    assert not TrainingSettings.from_params(keys("not_use_gradient_checkpoint=True")[0]).gradient_checkpointing
    with pytest.raises(UserError, match="contradicts"):
        TrainingSettings.from_params(keys("not_use_gradient_checkpoint=True gradient_checkpointing=True")[0])
    _, notes = parse_user_defined_parameters("not_use_gradient_checkpoint=True do_eval=False", PARAMS, "predict")
    assert notes == ["user-defined parameter not_use_gradient_checkpoint has no effect in --mode=predict",
                     "user-defined parameter do_eval has no effect in --mode=predict"]


@pytest.mark.parametrize("count", [0, 1])
def test_sample_images_per_checkpoint_or_none(tiny_model_dir, shapes_data, tmp_path, monkeypatch, count):
    # 32 rows in micro-batches of 16, 2 epochs: checkpoints at step 2 and (the end) step 4
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from appzoo.latent_diffusion import train_tasks

    steps = []

    def spy(model, captions, seeds, settings, **kwargs):
        steps.append(settings.steps)
        return generate(model, captions, seeds, settings, **kwargs)

    generate = train_tasks.generate
    monkeypatch.setattr(train_tasks, "generate", spy)
    out = str(tmp_path / "run")
    assert cli.main(train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=16", "--epoch_num=2",
                               "--save_checkpoint_steps=2",
                               udp=f"sample_images={count} sample_steps=3 sample_time_share=1")) == 0
    events = EventAccumulator(os.path.join(out, "log"), size_guidance={"images": 0})
    events.Reload()
    images = {tag: [(e.step, e.width, e.height) for e in events.Images(tag)] for tag in events.Tags()["images"]}
    assert images == ({"samples/0": [(2, 32, 32), (4, 32, 32)]} if count else {})
    assert steps == [3] * 2 * count
    assert "val/loss" in events.Tags()["scalars"]  # validation still runs without samples


def test_model_trained_at_another_resolution_is_saved_native_at_it(tiny_model_dir, shapes_data, tmp_path, caplog):
    out = str(tmp_path / "run")
    with caplog.at_level("INFO"):
        assert cli.main(train_argv(shapes_data, out, tiny_model_dir, "--micro_batch_size=16", "--epoch_num=1",
                                   udp="resolution=64 sample_images=0")) == 0
    assert "resolution=64 differs from the model's native size 32" in caplog.text
    for folder in (out, os.path.join(out, "last")):
        config = json.loads(open(os.path.join(folder, "config.json"), encoding="utf-8").read())
        assert config["image_size"] == 64 and config["unet"]["config"]["sample_size"] == 64 // config[
            "vae_scale_factor"]
    assert sd.load(out).image_size == 64
    table, predicted = tmp_path / "p.tsv", str(tmp_path / "o.tsv")
    table.write_text("a\t红色的圆形\n", encoding="utf-8")
    assert cli.main(predict_argv(str(table), predicted, out, "--output_schema=gen_imgbase64",
                                 udp="n_samples=1 ddim_steps=2")) == 0  # no H/W: the model's native size
    assert [decode(cell).shape for (cell,) in read_rows(predicted)] == [(64, 64, 3)]


def test_easynlp_format_model_trained_at_another_resolution_records_it(shapes_data, tmp_path):
    model = easynlp_checkpoint(tmp_path / "model")  # EasyNLP's format, 16 latent pixels = 32 px native
    out = str(tmp_path / "run")
    assert cli.main(train_argv(shapes_data, out, model, "--micro_batch_size=16", "--epoch_num=1",
                               udp="size=64 sample_images=0")) == 0
    expected = json.load(open(os.path.join(EASYNLP_DATA, "config.json"), encoding="utf-8"))
    expected["model"]["params"]["image_size"] = 32  # latent pixels: 64 px
    expected["model"]["params"]["unet_config"]["params"]["image_size"] = 32
    assert json.load(open(os.path.join(out, "config.json"), encoding="utf-8")) == expected
    assert sd.load(out).image_size == 64
    assert sd.load(model).image_size == 32  # the source is left as it was


def test_use_amp_without_native_bf16_trains_in_fp32_and_says_so(tiny_model_dir, shapes_data, tmp_path, monkeypatch,
                                                                 caplog):
    """Emulated bf16 autocast is many times slower than fp32 on a CPU without AVX512-BF16/AMX (a 3x3 convolution
    50x): --use_amp there trains in fp32, exactly like a run without it, and the log says why."""
    monkeypatch.setattr("modelzoo.optimize.cpu_supports_bf16", lambda: False)
    common = ("--micro_batch_size=8", "--epoch_num=1", "--learning_rate=1e-3")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with caplog.at_level("WARNING", logger="easynlp.train"):
        assert cli.main(train_argv(shapes_data, a, tiny_model_dir, *common, "--use_amp")) == 0
    assert "this CPU has no native bf16" in caplog.text and "training in fp32" in caplog.text
    assert cli.main(train_argv(shapes_data, b, tiny_model_dir, *common)) == 0
    wa, wb = weights(a), weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_high_noise_share_draws_the_noisiest_timesteps_and_leaves_the_other_draws(tiny_model_dir, shapes_data,
                                                                                   tmp_path, monkeypatch, capsys):
    from modelzoo.objectives import DiffusionObjective

    seen = []
    original = DiffusionObjective.loss

    def recording(self, latents, noise, timesteps, embeds, high=None, **kwargs):
        seen.append((timesteps.clone(), noise.clone(), high.clone(), self.high_noise_loss, kwargs["high_share"]))
        return original(self, latents, noise, timesteps, embeds, high=high, **kwargs)

    monkeypatch.setattr(DiffusionObjective, "loss", recording)
    common = ("--micro_batch_size=16", "--epoch_num=1", "--save_checkpoint_steps=100")
    assert cli.main(train_argv(shapes_data, str(tmp_path / "plain"), tiny_model_dir, *common)) == 0
    plain, seen[:] = list(seen), []
    assert cli.main(train_argv(shapes_data, str(tmp_path / "high"), tiny_model_dir, *common,
                               udp="high_noise_share=0.5 high_noise_from=990 high_noise_loss=x0")) == 0
    assert len(seen) == len(plain) == 2
    for (t0, n0, h0, _, _), (t, n, h, loss, share) in zip(plain, seen):
        assert not h0.any() and loss == "x0" and share == 0.5
        assert torch.equal(n, n0)  # the noise (and every other draw) is what it was without the option
        assert (t[h] >= 990).all() and torch.equal(t[~h], t0[~h])
    high = torch.cat([h for _, _, h, _, _ in seen])
    assert 8 <= int(high.sum()) <= 24  # about half of the 32 samples
    bad = train_argv(shapes_data, str(tmp_path / "bad"), tiny_model_dir, *common,
                     udp="high_noise_share=0.5 high_noise_from=1000")
    assert cli.main(bad) != 0
    assert "high_noise_from=1000: the model's schedule has timesteps 0-999" in capsys.readouterr().err
