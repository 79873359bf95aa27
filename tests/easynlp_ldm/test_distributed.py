"""torch.distributed on CPU (gloo), 2 processes, through the real `easynlp` command and torchrun's machinery."""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from tests.helpers import mixed_aspect_data, one_thread_run, train_argv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def easynlp(argv, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT, EASYNLP_PROGRESS="0", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "easynlp_ldm.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def finish(process, timeout=600):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def decode(cell):
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(cell))), dtype=np.int16)


def weights(folder):
    return torch.load(os.path.join(folder, "pytorch_model.bin"), weights_only=True)


def train_one_and_two(data, model, tmp_path, micro_batch_size, *common):
    """The same run in 1 process of ``2 × micro_batch_size`` and in 2 of ``micro_batch_size``: (the largest weight
    difference of their last/ checkpoints, the 2-process run's folder and stderr)."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    process = easynlp(train_argv(data, two, model, f"--micro_batch_size={micro_batch_size}", "--worker_gpu=2",
                                 f"--master_port={free_port()}", *common, udp="use_ema=False"))
    assert one_thread_run(train_argv(data, one, model, f"--micro_batch_size={2 * micro_batch_size}", *common,
                                     udp="use_ema=False")) == 0
    code, _, err = finish(process)
    assert code == 0, err
    w1, w2 = weights(os.path.join(one, "last")), weights(os.path.join(two, "last"))
    return max(float((w1[k] - w2[k]).abs().max()) for k in w1), two, err


def test_two_processes_of_4_train_like_one_of_8(tiny_model_dir, shapes_data, tmp_path):
    difference, two, _ = train_one_and_two(shapes_data, tiny_model_dir, tmp_path, 4, "--epoch_num=2",
                                           "--learning_rate=1e-3", "--save_checkpoint_steps=3")
    assert difference <= 1e-4
    assert os.listdir(os.path.join(two, "log"))  # rank 0 wrote TensorBoard
    # Resume with another world size: the 2-process run's state continues in 1 process.
    assert one_thread_run(train_argv(shapes_data, two, tiny_model_dir, "--micro_batch_size=8", "--epoch_num=3",
                                     "--learning_rate=1e-3", f"--resume_from_checkpoint={two}",
                                     udp="use_ema=False")) == 0


def test_bucketed_two_processes_of_4_train_like_one_of_8(tiny_model_dir, shapes_data, tmp_path):
    """Aspect-ratio buckets (wide, tall and square images): the same global batches, one bucket each, whatever the
    number of processes; a bucket's short batch leaves rank 1 a zero-weighted stand-in."""
    data = mixed_aspect_data(shapes_data, str(tmp_path / "data"))
    difference, _, err = train_one_and_two(data, tiny_model_dir, tmp_path, 4, "--epoch_num=2", "--learning_rate=1e-3")
    assert difference <= 1e-4
    assert "24×40: 11, 32×32: 10, 48×16: 11" in err and "step 12/12" in err


def test_short_last_batch_with_accumulation_trains_like_one_process(tiny_model_dir, shapes_data, tmp_path):
    """32 rows in global micro-batches of 6 (2 processes × 3): the last has 2 rows, both rank 0's, so rank 1 joins
    that step's all-reduce with a zero-weighted stand-in; accumulation 2 (steps of 2, 2, 2 micro-batches)."""
    difference, _, err = train_one_and_two(shapes_data, tiny_model_dir, tmp_path, 3, "--epoch_num=1",
                                           "--learning_rate=1e-3", "--gradient_accumulation_steps=2")
    assert difference <= 1e-4 and "step 3/3" in err


def test_sharded_predict_equals_single_process(tiny_model_dir, tmp_path):
    table = tmp_path / "p.tsv"
    table.write_text("".join(f"{i}\t{p}\n" for i, p in enumerate(["红色的圆形", "蓝色的正方形", "黄色的三角形",
                                                                   "绿色的圆形", "紫色的正方形"])), encoding="utf-8")
    base = ["--mode=predict", f"--tables={table}", f"--checkpoint_dir={tiny_model_dir}", "--micro_batch_size=2",
            "--output_schema=idx,sample_id,seed,gen_imgbase64", "--user_defined_parameters=n_samples=2 ddim_steps=2"]
    multi = easynlp(base + [f"--outputs={tmp_path / 'multi.tsv'}", "--worker_gpu=2", f"--master_port={free_port()}"])
    assert one_thread_run(base + [f"--outputs={tmp_path / 'single.tsv'}"]) == 0
    code, _, err = finish(multi)
    assert code == 0, err
    single = [r.split("\t") for r in (tmp_path / "single.tsv").read_text().splitlines()]
    multi = [r.split("\t") for r in (tmp_path / "multi.tsv").read_text().splitlines()]
    assert [r[:3] for r in multi] == [r[:3] for r in single] and len(single) == 10
    for a, b in zip(single, multi):  # same seeds → same images, whatever the batch (±1 from matmul blocking)
        assert np.abs(decode(a[3]) - decode(b[3])).max() <= 1
    assert not any(".part" in name for name in os.listdir(tmp_path))  # parts merged and removed


def _worker_pids(rank):
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"easynlp_ldm.cli" in cmdline:
            pids.append(int(pid))
    return pids


def test_a_killed_rank_ends_the_job_with_an_error_naming_it(tiny_model_dir, shapes_data, tmp_path):
    process = easynlp(train_argv(shapes_data, str(tmp_path / "run"), tiny_model_dir, "--micro_batch_size=4",
                                 "--epoch_num=200", "--worker_gpu=2", f"--master_port={free_port()}",
                                 "--collective_timeout=60"))
    deadline = time.time() + 120
    victims = []
    while time.time() < deadline and not victims:
        time.sleep(0.5)
        victims = _worker_pids(1)
        assert process.poll() is None, process.communicate()[1]
    time.sleep(5)  # let it get into training
    os.kill(victims[0], signal.SIGKILL)
    killed_at = time.time()
    code, _, err = finish(process, timeout=120)
    assert time.time() - killed_at < 60
    assert code != 0
    assert "worker rank 1 failed" in err and "SIGKILL" in err


def test_model_device_is_this_process_gpu_when_it_sees_one(monkeypatch):
    from easynlp_ldm import distributed

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.DistContext(rank=3, world_size=4, local_rank=1))
    assert distributed.model_device() == torch.device("cuda:1") and chosen == [1]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(distributed, "_CONTEXT", distributed.DistContext())
    assert distributed.model_device() == torch.device("cpu")


def test_inference_model_is_placed_on_the_model_device(tiny_model_dir, monkeypatch):
    """predict, evaluate and serve load through load_model: the model goes where model_device() says (meta stands in
    for a GPU here), before the optimisation level casts it."""
    from appzoo.latent_diffusion.loading import load_model
    from easynlp_ldm import distributed

    monkeypatch.setattr(distributed, "model_device", lambda: torch.device("meta"))
    model = load_model(tiny_model_dir, optimize="none")
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_easynlp_default_backend_nccl_falls_back_to_gloo_without_cuda(monkeypatch, caplog):
    """--distributed_backend defaults to EasyNLP's nccl; a CPU process joins with gloo and says so (a warning when
    the user named nccl), instead of failing."""
    from easynlp_ldm import distributed
    from easynlp_ldm.args import parse_flags

    assert parse_flags([]).distributed_backend == "nccl"
    backends = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout: backends.append(backend))
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    for explicit, level in ((False, "INFO"), (True, "WARNING")):
        monkeypatch.setattr(distributed, "_CONTEXT", distributed.DistContext())
        caplog.clear()
        with caplog.at_level("INFO", logger="easynlp.distributed"):
            distributed.init_from_env("nccl", 60.0, explicit=explicit)
        assert [(r.levelname, "uses gloo" in r.getMessage()) for r in caplog.records] == [(level, True)]
    assert backends == ["gloo", "gloo"]
