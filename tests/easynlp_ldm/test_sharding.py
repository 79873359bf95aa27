"""sharding=fsdp (issue 35): the trained modules sharded per block with FSDP2 over gloo on the CPU. 2 processes of
micro-batch 4 train like 1 process of 8, sharded or not (an unsharded single process is what DDP matches, see
test_distributed.py), with EMA, gradient clipping and accumulation; an interrupted sharded run resumed by the
identical command ends with the uninterrupted run's weights; the 2-process distributed checkpoint resumes in 1
process; the consolidated checkpoint is the usual folder and predicts the unsharded run's image; a tiny
Z-Image's transformer trains in 2 sharded processes like in 1 unsharded; on a CPU, glibc returns the freed per-block
buffers to the system."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from easynlp_ldm import cli
from tests.helpers import (
    dit_makers,
    easynlp_process,
    finished_output,
    free_port,
    interrupt_after_first_checkpoint,
    largest_difference,
    predicted_image,
    saved_weights,
    train_argv,
)

COMMON = ["--epoch_num=2", "--learning_rate=1e-3", "--save_checkpoint_steps=3", "--gradient_accumulation_steps=2",
          "--max_grad_norm=0.5"]
FSDP = "sharding=fsdp sample_images=0"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, shapes_data, tmp_path_factory):
    """The same SD-1.x run (EMA on, clipped, 2 micro-batches per step, a checkpoint mid-way) unsharded in 1 process
    of 8, sharded in 1 process of 8 and sharded in 2 processes of 4: their checkpoint folders."""
    root = tmp_path_factory.mktemp("sharding")
    folders = {name: str(root / name) for name in ("plain", "one", "two")}
    two = easynlp_process(train_argv(shapes_data, folders["two"], tiny_model_dir, "--micro_batch_size=4",
                                     "--worker_gpu=2", f"--master_port={free_port()}", *COMMON, udp=FSDP))
    for name, udp in (("plain", "sample_images=0"), ("one", FSDP)):
        assert cli.main(train_argv(shapes_data, folders[name], tiny_model_dir, "--micro_batch_size=8", *COMMON,
                                   udp=udp)) == 0
    finished_output(two)
    return folders


def test_two_sharded_processes_of_4_train_like_one_of_8(runs):
    plain, one, two = (saved_weights(os.path.join(runs[name], "last")) for name in ("plain", "one", "two"))
    assert largest_difference(one, plain) <= 1e-4
    assert largest_difference(two, one) <= 1e-4
    # The consolidated checkpoint is the usual folder: the best (validated) weights at its top, last/ beside them.
    assert sorted(os.listdir(os.path.join(runs["two"], "training_state"))) == ["shards", "state.pt",
                                                                              "trainer_meta.json"]
    assert largest_difference(saved_weights(runs["two"]), two) == 0


def test_killed_sharded_run_resumed_by_the_identical_command_ends_as_uninterrupted(runs, tiny_model_dir,
                                                                                    shapes_data, tmp_path,
                                                                                    monkeypatch):
    argv = train_argv(shapes_data, str(tmp_path / "run"), tiny_model_dir, "--micro_batch_size=8", *COMMON, udp=FSDP)
    interrupt_after_first_checkpoint(monkeypatch, argv)
    assert cli.main(argv) == 0
    resumed, uninterrupted = (saved_weights(os.path.join(folder, "last")) for folder in (tmp_path / "run",
                                                                                           runs["one"]))
    assert largest_difference(resumed, uninterrupted) <= 1e-5


def test_two_process_state_resumes_in_one_process(runs, tiny_model_dir, shapes_data, tmp_path):
    """The 2-process run's distributed checkpoint, resharded into 1 process, continues (one epoch more) as the
    1-process run's state does."""
    ends = {}
    for name in ("one", "two"):
        folder = str(tmp_path / name)
        shutil.copytree(runs[name], folder)
        argv = train_argv(shapes_data, folder, tiny_model_dir, "--micro_batch_size=8", "--epoch_num=3",
                          "--learning_rate=1e-3", "--max_grad_norm=0.5", f"--resume_from_checkpoint={folder}",
                          udp=FSDP)
        assert cli.main(argv) == 0
        ends[name] = saved_weights(os.path.join(folder, "last"))
    assert largest_difference(ends["one"], ends["two"]) <= 1e-4
    assert largest_difference(ends["two"], saved_weights(os.path.join(runs["two"], "last"))) > 1e-3  # it trained


def test_sharded_checkpoint_predicts_the_unsharded_runs_image(runs, tmp_path):
    sharded, _ = predicted_image(runs["two"], str(tmp_path), "", seed=5, steps=3)
    unsharded, _ = predicted_image(runs["plain"], str(tmp_path), "", seed=5, steps=3)
    assert abs(sharded - unsharded).max() <= 2


def test_resuming_an_unsharded_state_sharded_is_refused(runs, tiny_model_dir, shapes_data, tmp_path, capsys):
    folder = str(tmp_path / "plain")
    shutil.copytree(runs["plain"], folder)
    argv = train_argv(shapes_data, folder, tiny_model_dir, "--micro_batch_size=8", "--epoch_num=3",
                      f"--resume_from_checkpoint={folder}", udp=FSDP)
    assert cli.main(argv) == 2
    assert "saved by an unsharded run; resume it with sharding=none" in capsys.readouterr().err


def test_dit_transformer_two_sharded_processes_of_4_train_like_one_of_8(shapes_data, tmp_path):
    model = dit_makers()["zimage"](str(tmp_path / "zimage"))
    udp = "train_target=transformer caption_dropout=0.3 sample_images=0"
    common = [*COMMON, "--warmup_proportion=0"]
    folders = {name: str(tmp_path / name) for name in ("plain", "fsdp")}
    two = easynlp_process(train_argv(shapes_data, folders["fsdp"], model, "--micro_batch_size=4", "--worker_gpu=2",
                                     f"--master_port={free_port()}", *common, udp=f"{udp} sharding=fsdp"))
    assert cli.main(train_argv(shapes_data, folders["plain"], model, "--micro_batch_size=8", *common, udp=udp)) == 0
    finished_output(two)
    plain, sharded = (load_file(os.path.join(folder, "last", "transformer", "diffusion_pytorch_model.safetensors"))
                      for folder in folders.values())
    assert largest_difference(plain, sharded) <= 1e-4


def test_gathered_weights_live_in_file_backed_memory_of_the_writer_alone(tmp_path):
    """The writer's whole weights are mappings of files in its scratch folder (page cache, not the process's own
    memory); the other processes keep nothing."""
    from easynlp_ldm import sharding

    tensors = {"unet.a": torch.randn(3, 4), "unet.b": torch.arange(5, dtype=torch.bfloat16)}
    whole = sharding.gathered(tensors, str(tmp_path))
    assert all(torch.equal(whole[name], tensors[name]) and whole[name].dtype == tensors[name].dtype
               for name in tensors)
    assert sorted(whole) == sorted(tensors)
    assert [whole[name].untyped_storage().filename for name in tensors] == [str(tmp_path / f"{i}.bin")
                                                                           for i in range(2)]
    assert sharding.gathered(tensors, None) == {}


class _Libc:
    """ctypes' libc stand-in: records mallopt's calls."""

    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return 1


@pytest.fixture
def libc(monkeypatch):
    """A glibc process that has not yet set its mmap threshold, without MALLOC_MMAP_THRESHOLD_ or glibc tunables."""
    import ctypes
    import platform

    from easynlp_ldm import sharding

    fake = _Libc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: fake)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(sharding, "_mmap_threshold_set", False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    return fake


def test_a_cpu_run_returns_freed_buffers_to_the_system_once(libc, caplog):
    from easynlp_ldm import sharding

    with caplog.at_level("INFO", logger="easynlp.trainer"):
        sharding.return_freed_buffers(torch.device("cpu"))
        sharding.return_freed_buffers(torch.device("cpu"))
    assert libc.calls == [(-3, 65536)]  # M_MMAP_THRESHOLD
    assert sum("glibc's mmap threshold" in message for message in caplog.messages) == 1


@pytest.mark.parametrize("variable, setting", [("MALLOC_MMAP_THRESHOLD_", "1048576"),
                                               ("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1048576")])
def test_a_users_mmap_threshold_is_left_alone(libc, monkeypatch, variable, setting):
    from easynlp_ldm import sharding

    monkeypatch.setenv(variable, setting)
    sharding.return_freed_buffers(torch.device("cpu"))
    assert libc.calls == []


def test_no_mallopt_off_glibc_or_off_the_cpu(libc, monkeypatch):
    import platform

    from easynlp_ldm import sharding

    sharding.return_freed_buffers(torch.device("cuda"))
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    sharding.return_freed_buffers(torch.device("cpu"))
    assert libc.calls == []
