"""The trainer on a toy task (a small regression net): settings from the flags, the plan of the remaining steps,
exact resume, the training state's files, DistributedDataParallel (2 processes, gloo) against one process. Fast;
no diffusion model (test_distributed.py runs the real app through torchrun)."""

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from easynlp_ldm.args import FLAGS_BY_DEST, parse_flags
from easynlp_ldm.trainer import Trainer, TrainerConfig, sampling_refusal
from easynlp_ldm.training_state import META_FILE, STATE_DIR, STATE_FILE
from tests.helpers import free_port

APP_SETTINGS = {"use_ema", "ema_decay", "rank", "world_size", "progress", "sample_images", "sample_time_share",
                "optimizer", "save_optimizer", "ema_device", "sharding"}


class ToyTask:
    def __init__(self, num_examples=13):
        generator = torch.Generator().manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        with torch.no_grad():
            for param in self.net.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        self.x = torch.randn(num_examples, 4, generator=generator)
        self.y = self.x.sum(dim=1, keepdim=True).sin()
        self.seen: list[list[int]] = []  # the micro-batches' sample indices, in the order they were trained on
        self.sampled: list[int] = []  # the count of each sample_images call

    def trainable_modules(self):
        return {"net": self.net}

    def num_examples(self):
        return len(self.x)

    def batches(self, order, epoch):
        for indices in order:
            self.seen.append(list(indices))
            yield self.x[indices], self.y[indices]

    def loss(self, batch):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validate(self):
        return None

    def save_model(self, folder, weights):
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, "weights.pt")
        torch.save(weights, path)
        return [path]

    def sample_images(self, count):
        self.sampled.append(count)
        return []


def toy_config(out, *argv, **app):
    settings = dict(use_ema=False, ema_decay=0.9, rank=0, world_size=1, progress=False, sample_images=2,
                    sample_time_share=0.1, optimizer="adamw", save_optimizer=True, ema_device="", sharding="none")
    settings.update(app)
    flags = parse_flags(["--mode=train", f"--checkpoint_dir={out}", "--learning_rate=0.05", "--warmup_proportion=0",
                         "--logging_steps=1", *argv])
    return TrainerConfig.from_flags(flags, **settings)


def train_toy(out, *argv, task=None, **app):
    task = task or ToyTask()
    trainer = Trainer(toy_config(out, *argv, **app), task)
    trainer.train()
    return trainer


def saved_weights(out):
    return torch.load(os.path.join(out, "last", "weights.pt"), weights_only=True)


def test_config_is_read_from_the_flags_without_restated_defaults(tmp_path):
    fields = dataclasses.fields(TrainerConfig)
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING for f in fields)
    assert {f.name for f in fields} - set(FLAGS_BY_DEST) == APP_SETTINGS
    config = toy_config(tmp_path, "--random_seed=7", "--train_batch_size=5", use_ema=True)
    for field in fields:
        if field.name not in APP_SETTINGS and field.name not in ("checkpoint_dir", "learning_rate", "random_seed",
                                                                 "micro_batch_size", "warmup_proportion",
                                                                 "logging_steps"):
            assert getattr(config, field.name) == FLAGS_BY_DEST[field.name].default, field.name
    assert (config.random_seed, config.micro_batch_size, config.checkpoint_dir) == (7, 5, str(tmp_path))
    assert config.use_ema is True and config.world_size == 1
    with pytest.raises(TypeError, match="come from the flags"):
        TrainerConfig.from_flags(parse_flags([]), learning_rate=1.0, use_ema=False, ema_decay=0.9, rank=0,
                                 world_size=1, progress=False, sample_images=2, sample_time_share=0.1,
                                 optimizer="adamw", save_optimizer=True, ema_device="", sharding="none")
    with pytest.raises(TypeError):  # an app setting left out
        TrainerConfig.from_flags(parse_flags([]), use_ema=False, rank=0, world_size=1, progress=False,
                                 sample_images=2, sample_time_share=0.1, optimizer="adamw", save_optimizer=True,
                                 ema_device="")


def test_plan_continues_from_the_saved_position_up_to_the_total(tmp_path):
    # 13 examples, micro-batch 2 → 7 micro-batches per epoch; accumulation 3 → steps of 3, 3, 1; 1.5 epochs → 5 steps
    trainer = Trainer(toy_config(tmp_path, "--micro_batch_size=2", "--gradient_accumulation_steps=3",
                                 "--epoch_num=1.5"), ToyTask())
    assert trainer.total_steps == 5
    plan = [(epoch, [(len(s.micro_batches), s.end) for s in steps]) for epoch, steps in trainer.plan()]
    assert plan == [(0, [(3, 3), (3, 6), (1, 7)]), (1, [(3, 3), (3, 6)])]
    trainer.step, trainer.epoch, trainer.micro_position = 2, 0, 6
    plan = [(epoch, [(len(s.micro_batches), s.end) for s in steps]) for epoch, steps in trainer.plan()]
    assert plan == [(0, [(1, 7)]), (1, [(3, 3), (3, 6)])]
    trainer.step, trainer.epoch, trainer.micro_position = 3, 0, 7  # saved at the end of epoch 0
    assert [(epoch, len(steps)) for epoch, steps in trainer.plan()] == [(0, 0), (1, 2)]
    trainer.step = 5
    assert list(trainer.plan()) == []


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path):
    argv = ("--micro_batch_size=2", "--gradient_accumulation_steps=2", "--epoch_num=2.5", "--save_checkpoint_steps=3")
    full = ToyTask()
    train_toy(tmp_path / "full", *argv, task=full, use_ema=True)

    class Crash(Exception):
        pass

    crashing = ToyTask()
    original = crashing.loss
    calls = {"n": 0}

    def loss(batch):  # dies in step 8 (epoch 1), after the checkpoint at step 6
        calls["n"] += 1
        if calls["n"] == 15:
            raise Crash
        return original(batch)

    crashing.loss = loss
    with pytest.raises(Crash):
        train_toy(tmp_path / "run", *argv, task=crashing, use_ema=True)
    meta = json.loads((tmp_path / "run" / STATE_DIR / META_FILE).read_text())
    assert (meta["step"], meta["epoch"], meta["micro_position"]) == (6, 1, 4)
    resumed = ToyTask()
    trainer = train_toy(tmp_path / "run", *argv, f"--resume_from_checkpoint={tmp_path / 'run'}", task=resumed,
                        use_ema=True)
    assert trainer.step == 10 and (trainer.epoch, trainer.micro_position) == (2, 4)
    # 7 micro-batches an epoch: the state at step 6 is 4 into epoch 1; the resumed run goes on from there
    assert crashing.seen[:11] == full.seen[:11] and resumed.seen == full.seen[11:]
    expected, got = saved_weights(tmp_path / "full"), saved_weights(tmp_path / "run")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_training_state_folder_is_swapped_in_whole(tmp_path):
    trainer = train_toy(tmp_path, "--micro_batch_size=4", "--epoch_num=1")
    state = tmp_path / STATE_DIR
    assert sorted(os.listdir(state)) == [STATE_FILE, META_FILE]
    assert not (tmp_path / (STATE_DIR + ".tmp")).exists() and not (tmp_path / (STATE_DIR + ".old")).exists()
    meta = json.loads((state / META_FILE).read_text())
    assert meta == {"step": 4, "epoch": 1, "micro_position": 0, "total_steps": 4, "seed": 1234}
    trainer.save_training_state()  # again over the existing one: still one complete folder, nothing left beside it
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(STATE_DIR)) == [STATE_DIR]
    saved = torch.load(state / STATE_FILE, weights_only=True)
    assert saved["step"] == 4 and set(saved["weights"]) == {"net.0.weight", "net.0.bias", "net.2.weight",
                                                            "net.2.bias"}


def _toy_worker(rank, world_size, port, out, argv):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from easynlp_ldm import distributed

    context = distributed.init_from_env("gloo", 60)
    try:
        task = ToyTask()
        train_toy(out, *argv, task=task, rank=context.rank, world_size=context.world_size)
        torch.save(task.seen, os.path.join(out, f"seen-{rank}.pt"))
    finally:
        distributed.shutdown()


def test_ddp_short_last_batch_and_accumulation_train_like_one_process(tmp_path):
    """13 examples in global micro-batches of 6 (2 ranks × 3): the last has 1 sample, so rank 1's slice is empty on
    the micro-batch whose backward pass all-reduces (accumulation 2: steps of 2, 1 micro-batches) and it must still
    join, adding nothing. With clipping, so the gradient's norm must be the global one."""
    argv = ("--gradient_accumulation_steps=2", "--epoch_num=3", "--max_grad_norm=0.5", "--save_checkpoint_steps=2")
    one, two = tmp_path / "one", tmp_path / "two"
    task = ToyTask()
    train_toy(one, "--micro_batch_size=6", *argv, task=task)
    torch.multiprocessing.spawn(_toy_worker, args=(2, free_port(), str(two), ("--micro_batch_size=3", *argv)),
                                nprocs=2)
    w1, w2 = saved_weights(one), saved_weights(two)
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) <= 1e-6
    seen = [torch.load(two / f"seen-{rank}.pt") for rank in (0, 1)]
    # 3 micro-batches an epoch; the last has 1 sample: rank 0's, which rank 1 runs as its zero-weighted stand-in
    assert [len(b) for b in seen[0]] == [3, 3, 1] * 3 and seen[1][2::3] == seen[0][2::3]
    trained = seen[0] + [b for i, b in enumerate(seen[1]) if i % 3 != 2]
    assert sorted(i for b in trained for i in b) == sorted(i for b in task.seen for i in b)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class TimedToyTask(ToyTask):
    """Each micro-batch's loss takes ``step_seconds`` and each sample image ``image_seconds`` of a fake clock."""

    def __init__(self, clock, step_seconds, image_seconds):
        super().__init__()
        self.clock, self.step_seconds, self.image_seconds = clock, step_seconds, image_seconds
        self.sampled_at: list[int] = []  # the optimiser step of each sampling

    def loss(self, batch):
        self.clock.now += self.step_seconds
        return super().loss(batch)

    def sample_images(self, count):
        self.sampled.append(count)
        self.sampled_at.append(self.trainer.step)
        self.clock.now += self.image_seconds * count
        return [(f"caption {i}", np.full((4, 6, 3), 40 * i, dtype=np.uint8)) for i in range(count)]


def _images_logged(out):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(out, "log"), size_guidance={"images": 0})
    events.Reload()
    return {tag: [e.step for e in events.Images(tag)] for tag in events.Tags()["images"]}


def _timed_run(out, monkeypatch, image_seconds, count, share, step_seconds=1.0):
    """13 examples in micro-batches of 4: 4 steps an epoch, 3 epochs, checkpoints at steps 2, 4, … 12."""
    from easynlp_ldm import trainer as trainer_module

    clock = FakeClock()
    monkeypatch.setattr(trainer_module, "_clock", clock)
    task = TimedToyTask(clock, step_seconds, image_seconds)
    trainer = Trainer(toy_config(out, "--micro_batch_size=4", "--epoch_num=3", "--save_checkpoint_steps=2",
                                 sample_images=count, sample_time_share=share), task)
    task.trainer = trainer
    trainer.train()
    return task, trainer


def test_sample_images_count_and_none(tmp_path, monkeypatch):
    task, _ = _timed_run(str(tmp_path / "one"), monkeypatch, image_seconds=0.0, count=1, share=0.1)
    assert task.sampled_at == [2, 4, 6, 8, 10, 12]  # every checkpoint, the last one included
    assert _images_logged(str(tmp_path / "one")) == {"samples/0": [2, 4, 6, 8, 10, 12]}
    task, _ = _timed_run(str(tmp_path / "three"), monkeypatch, image_seconds=0.0, count=3, share=0.1)
    assert set(task.sampled) == {3}
    assert sorted(_images_logged(str(tmp_path / "three"))) == ["samples/0", "samples/1", "samples/2"]
    task, _ = _timed_run(str(tmp_path / "none"), monkeypatch, image_seconds=0.0, count=0, share=0.1)
    assert task.sampled == [] and _images_logged(str(tmp_path / "none")) == {}


def test_sampling_skipped_beyond_its_share_of_the_training_time(tmp_path, monkeypatch, caplog):
    # A step takes 1 s, an image 1 s; share 0.25. Step 2 (2 s in): the first sampling runs (nothing measured yet).
    # Step 4 (5 s in): 1 s more would make 2 s of 6, over 1.5 → skipped. Step 6 (7 s): 2 of 8 → runs. Step 8 (10 s):
    # 3 of 11, over 2.75 → skipped. Step 10 (12 s): 3 of 13 → runs. Step 12 (15 s): 4 of 16 → runs.
    with caplog.at_level("INFO", logger="easynlp.trainer"):
        task, trainer = _timed_run(str(tmp_path / "run"), monkeypatch, image_seconds=1.0, count=1, share=0.25)
    assert task.sampled_at == [2, 6, 10, 12]
    assert _images_logged(str(tmp_path / "run")) == {"samples/0": [2, 6, 10, 12]}
    skipped = [r.getMessage() for r in caplog.records if "no sample images" in r.getMessage()]
    assert len(skipped) == 2 and skipped[0].startswith("step 4: no sample images for TensorBoard: 1 would take "
                                                       "about 1.0 s") and "over sample_time_share=0.25" in skipped[0]
    assert trainer.sampling_seconds == 4.0
    # Slow sampling (an image costs 20 steps): only the first sampling runs; share 1: no limit.
    task, _ = _timed_run(str(tmp_path / "slow"), monkeypatch, image_seconds=20.0, count=2, share=0.1)
    assert task.sampled_at == [2]
    task, _ = _timed_run(str(tmp_path / "unlimited"), monkeypatch, image_seconds=20.0, count=2, share=1.0)
    assert task.sampled_at == [2, 4, 6, 8, 10, 12]


def test_sampling_refusal_rule():
    assert sampling_refusal(0.0, None, 2, 0.0, 0.1) is None  # first time: allowed
    assert sampling_refusal(10.0, 5.0, 2, 190.0, 0.1) is None  # 20 s of 200 s: exactly the share
    assert "2 would take about 10.0 s (5.0 s each last time)" in sampling_refusal(10.0, 5.0, 2, 189.0, 0.1)
    assert sampling_refusal(100.0, 1e6, 3, 100.0, 1.0) is None  # share 1: never refused (all of it was sampling)


# ----------------------------------------------------------------------------------------------- memory options
def _losses(trainer_cls_task, out, *argv, **app):
    task = trainer_cls_task
    trainer = Trainer(toy_config(out, *argv, **app), task)
    losses = []
    original = trainer._optimiser_step

    def step(micro_batches):
        result = original(micro_batches)
        losses.append(result[0])
        return result

    trainer._optimiser_step = step
    trainer.train()
    return trainer, losses


def test_adafactor_is_transformers_factored_and_trains(tmp_path):
    from transformers.optimization import Adafactor

    trainer, losses = _losses(ToyTask(), tmp_path, "--micro_batch_size=4", "--epoch_num=20",
                              "--learning_rate=0.01", optimizer="adafactor")
    optimizer = trainer.optimizer
    assert isinstance(optimizer, Adafactor)
    assert optimizer.defaults["relative_step"] is False and optimizer.defaults["scale_parameter"] is False
    state = optimizer.state[trainer.net.parts["net"][0].weight]
    assert set(state) >= {"exp_avg_sq_row", "exp_avg_sq_col"} and "exp_avg" not in state  # factored, no 1st moment
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:8]) / 8


def test_save_optimizer_false_links_the_saved_weights_and_resume_restarts_the_optimiser(tmp_path, caplog):
    argv = ("--micro_batch_size=2", "--epoch_num=2", "--save_checkpoint_steps=3")
    for use_ema, linked in ((False, "weights"), (True, "ema")):
        out = tmp_path / f"ema{use_ema}"
        trainer = train_toy(out, *argv, save_optimizer=False, use_ema=use_ema)
        state_dir = out / STATE_DIR
        state = torch.load(state_dir / STATE_FILE, weights_only=True)
        assert state["optimizer"] is None and state["linked"] == linked
        # no second copy on disk: the training state's weights are the checkpoint's file, hard-linked
        assert os.path.samefile(state_dir / "model_weights.bin", out / "last" / "weights.pt")
        assert (state["weights"] is None) == (not use_ema)
        with caplog.at_level("WARNING", logger="easynlp.trainer"):
            resumed = train_toy(out, "--micro_batch_size=2", "--epoch_num=3", "--save_checkpoint_steps=3",
                                f"--resume_from_checkpoint={out}", save_optimizer=False, use_ema=use_ema)
        assert "saved without the optimiser state (save_optimizer=False): the optimiser restarts at step 14" \
            in caplog.text
        assert resumed.step == 21
        raw = {name: p.detach() for name, p in trainer.named_params}
        if use_ema:  # raw weights stored, EMA read back from the link
            assert all(torch.equal(state["weights"][k], v) for k, v in raw.items())
        caplog.clear()
    # save_optimizer=True (the default): the optimiser state is saved, nothing linked
    out = tmp_path / "default"
    train_toy(out, *argv)
    state = torch.load(out / STATE_DIR / STATE_FILE, weights_only=True)
    assert state["optimizer"]["state"] and state["linked"] is None
    assert not (out / STATE_DIR / "model_weights.bin").exists()


def test_ema_in_ram_updates_like_the_ema_on_the_device(tmp_path, monkeypatch):
    # ema_device=cpu with weights on a GPU updates the shadow one parameter at a time; forced here on CPU tensors
    base = train_toy(tmp_path / "a", "--micro_batch_size=4", "--epoch_num=2", use_ema=True)
    monkeypatch.setattr(Trainer, "_ema_on_host", lambda self: True)
    host = train_toy(tmp_path / "b", "--micro_batch_size=4", "--epoch_num=2", use_ema=True, ema_device="cpu")
    for a, b in zip(base.ema.shadow_params, host.ema.shadow_params):
        assert torch.allclose(a, b, atol=1e-6)
    assert host.ema.optimization_step == base.ema.optimization_step


def test_checkpoint_weights_are_not_copied_in_memory(tmp_path):
    trainer = Trainer(toy_config(tmp_path, use_ema=True), ToyTask())
    for name, param in trainer.named_params:
        assert trainer.weights()[name].data_ptr() == param.data_ptr()
    for (name, _), shadow in zip(trainer.named_params, trainer.ema.shadow_params):
        assert trainer.ema_weights()[name].data_ptr() == shadow.data_ptr()


def test_images_per_second_count_training_time_not_checkpoints(tmp_path, monkeypatch):
    """A fake clock: each optimiser step takes 1 s, each checkpoint 100 s. With micro-batches of 4 the rate is 4
    images/s at every step, the ones right after a checkpoint included."""
    import easynlp_ldm.trainer as trainer_module

    now = [0.0]
    monkeypatch.setattr(trainer_module.time, "time", lambda: now[0])

    class Clocked(ToyTask):
        def loss(self, batch):
            now[0] += 1.0
            return super().loss(batch)

        def save_model(self, folder, weights):
            now[0] += 100.0
            return super().save_model(folder, weights)

    rates = []
    original = Trainer._report_step
    monkeypatch.setattr(Trainer, "_report_step",
                        lambda self, bar, loss, speed: (rates.append(speed), original(self, bar, loss, speed))[1])
    train_toy(str(tmp_path / "run"), "--micro_batch_size=4", "--epoch_num=2", "--save_checkpoint_steps=2",
              "--logging_steps=3", task=Clocked(num_examples=16))
    assert len(rates) == 8 and all(abs(rate - 4.0) < 1e-6 for rate in rates), rates
