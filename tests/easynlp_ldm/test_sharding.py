"""sharding=fsdp (issue 35): the trained modules sharded per block with FSDP2 over gloo on the CPU. 2 processes of
micro-batch 4 train like 1 process of 8, sharded or not (an unsharded single process is what DDP matches, see
test_distributed.py), with EMA, gradient clipping and accumulation; a 2-process run SIGKILLed with its workers and
rerun by the identical command ends with the uninterrupted run's weights; its distributed checkpoint resumes in 1
and in 4 processes; the consolidated checkpoint is the usual folder, predicts the unsharded run's image and loads in
diffusers — for SD-1.x and for a tiny Z-Image's transformer. A LoRA over int8 weights and a ControlNet train sharded
in 2 processes as in 1; on a CPU, glibc returns the freed per-block buffers to the system."""

import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from easynlp_ldm import cli
from tests.helpers import (
    controlnet_argv,
    dit_makers,
    easynlp_process,
    finished_output,
    free_port,
    kill_after_first_checkpoint,
    largest_difference,
    one_thread_run,
    predicted_image,
    saved_weights,
    train_argv,
    with_control_column,
)

COMMON = ["--epoch_num=2", "--learning_rate=1e-3", "--save_checkpoint_steps=3", "--gradient_accumulation_steps=2",
          "--max_grad_norm=0.5"]
FSDP = "sharding=fsdp sample_images=0"
DIT = "train_target=transformer caption_dropout=0.3 sample_images=0"


def _processes(argv, count):
    """``argv`` with ``count`` processes of 8 / ``count`` samples each (a global micro-batch of 8)."""
    extra = [f"--worker_gpu={count}", f"--master_port={free_port()}"] if count > 1 else []
    return [*argv, f"--micro_batch_size={8 // count}", *extra]


def _run(argv, count):
    """Train: in this process (1), or as the `easynlp` command with ``count`` workers; returns its output."""
    if count == 1:
        assert cli.main(argv) == 0
        return ""
    return finished_output(easynlp_process(argv))


def _killed(argv, folder, copy=None):
    """The command ``argv`` (checkpoint_dir ``folder``) SIGKILLed after its first checkpoint (the workers it launched
    die with it), its folder copied to ``copy`` as the kill left it."""
    assert kill_after_first_checkpoint(easynlp_process(argv), folder, timeout=300) == 3  # of 4 steps
    if copy:
        shutil.copytree(folder, copy)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, shapes_data, tmp_path_factory):
    """The same SD-1.x run (EMA on, clipped, 2 micro-batches per step, a checkpoint mid-way) unsharded in 1 process
    of 8, sharded in 1 process of 8 and sharded in 2 processes of 4; "rerun": the sharded 1-process run SIGKILLed
    after its checkpoint at step 3 and run again by the identical command."""
    root = tmp_path_factory.mktemp("sharding")
    folders = {name: str(root / name) for name in ("plain", "one", "two", "rerun")}
    argv = {name: _processes(train_argv(shapes_data, folders[name], tiny_model_dir, *COMMON, udp=udp), count)
            for name, udp, count in (("plain", "sample_images=0", 1), ("one", FSDP, 1), ("two", FSDP, 2),
                                     ("rerun", FSDP, 1))}
    two = easynlp_process(argv["two"])
    _killed([*argv["rerun"], "--worker_cpu=1"], folders["rerun"])
    for name in ("rerun", "one"):  # one thread, as the killed process: the same sums
        assert one_thread_run(argv[name]) == 0
    _run(argv["plain"], 1)
    finished_output(two)
    return folders


def test_two_sharded_processes_of_4_train_like_one_of_8_and_resume_after_sigkill(runs):
    plain, one, two, rerun = (saved_weights(os.path.join(runs[name], "last"))
                              for name in ("plain", "one", "two", "rerun"))
    assert largest_difference(one, plain) <= 1e-4
    assert largest_difference(two, one) <= 1e-4
    assert largest_difference(rerun, one) <= 1e-5  # SIGKILL + the identical command: the uninterrupted weights
    # The consolidated checkpoint is the usual folder: the best (validated) weights at its top, last/ beside them.
    assert sorted(os.listdir(os.path.join(runs["two"], "training_state"))) == ["shards", "state.pt",
                                                                              "trainer_meta.json"]
    assert largest_difference(saved_weights(runs["two"]), two) == 0


def test_two_process_state_resumes_in_one_process(runs, tiny_model_dir, shapes_data, tmp_path):
    """The 2-process run's distributed checkpoint, resharded into 1 process, continues (one epoch more) as the
    1-process run's state does (the tiny Z-Image's test resumes a mid-epoch state in 1 and 4 processes)."""
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


def test_sharded_checkpoint_predicts_the_unsharded_runs_image_and_loads_in_diffusers(runs, tmp_path):
    from diffusers import StableDiffusionPipeline

    sharded, seed = predicted_image(runs["two"], str(tmp_path), "", seed=5, steps=3)
    unsharded, _ = predicted_image(runs["plain"], str(tmp_path), "", seed=5, steps=3)
    assert abs(sharded - unsharded).max() <= 2
    out = str(tmp_path / "diffusers")
    assert cli.main(["--mode=export", f"--checkpoint_dir={runs['two']}", f"--outputs={out}",
                     "--user_defined_parameters=export_format=diffusers"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("一个红色的圆形", generator=torch.Generator("cpu").manual_seed(seed), num_inference_steps=3,
                 guidance_scale=5.0, height=32, width=32).images[0]
    assert abs(np.asarray(image, dtype=np.int16) - sharded).max() <= 3


def test_resuming_an_unsharded_state_sharded_is_refused(runs, tiny_model_dir, shapes_data, tmp_path, capsys):
    folder = str(tmp_path / "plain")
    shutil.copytree(runs["plain"], folder)
    argv = train_argv(shapes_data, folder, tiny_model_dir, "--micro_batch_size=8", "--epoch_num=3",
                      f"--resume_from_checkpoint={folder}", udp=FSDP)
    assert cli.main(argv) == 2
    assert "saved by an unsharded run; resume it with sharding=none" in capsys.readouterr().err


def test_dit_transformer_killed_in_2_sharded_processes_and_resumed_in_1_2_and_4_trains_as_unsharded(shapes_data,
                                                                                                   tmp_path):
    """A tiny Z-Image's transformer: the 2-process sharded run SIGKILLed after its checkpoint (mid-epoch) and run
    again by the identical command, and its state resumed in 1 and in 4 processes, each end with the unsharded
    1-process run's transformer; the folder loads in diffusers' ZImagePipeline, which draws predict's image."""
    from diffusers import DiffusionPipeline

    model = dit_makers()["zimage"](str(tmp_path / "zimage"))
    common = [*COMMON, "--warmup_proportion=0"]
    folders = {name: str(tmp_path / name) for name in ("plain", "rerun", "killed", "in1", "in4")}

    def argv(name, udp=f"{DIT} sharding=fsdp", *extra):
        return train_argv(shapes_data, folders[name], model, *common, *extra, udp=udp)

    rerun = _processes(argv("rerun"), 2)
    _killed(rerun, folders["rerun"], folders["killed"])
    started = easynlp_process(rerun)
    _run(_processes(argv("plain", DIT), 1), 1)
    finished_output(started)
    for count in (1, 4):
        shutil.copytree(folders["killed"], folders[f"in{count}"])
        resume = f"--resume_from_checkpoint={folders[f'in{count}']}"
        _run(_processes(argv(f"in{count}", f"{DIT} sharding=fsdp", resume), count), count)
    plain, *sharded = (load_file(os.path.join(folders[name], "last", "transformer",
                                              "diffusion_pytorch_model.safetensors"))
                       for name in ("plain", "rerun", "in1", "in4"))
    assert max(largest_difference(plain, weights) for weights in sharded) <= 1e-4

    ours, seed = predicted_image(folders["rerun"], str(tmp_path), "scale=0", seed=7, steps=2)
    pipe = DiffusionPipeline.from_pretrained(folders["rerun"], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("一个红色的圆形", height=32, width=32, num_inference_steps=2, output_type="np", guidance_scale=0.0,
                  generator=torch.Generator().manual_seed(seed)).images[0]
    assert np.abs(ours - (theirs * 255).round().astype(np.int16)).max() <= 3


def test_int8_lora_and_controlnet_train_sharded_in_two_processes_as_in_one(tiny_model_dir, shapes_data, tmp_path):
    """train_target=lora base_precision=int8 (the quantised weights whole in each process, the rest sharded) and
    train_target=controlnet, sharded: 2 processes of 4 end as 1 process of 8 (the ControlNet: as an unsharded run,
    its frozen base in fp32); the sharded adapter is the unsharded run's file (names, dtypes) and loads in
    diffusers."""
    from diffusers import StableDiffusionPipeline

    lora = "train_target=lora base_precision=int8 use_ema=False sample_images=0"
    control = with_control_column(shapes_data, str(tmp_path / "data"))
    runs = {("lora", "two"): (train_argv, shapes_data, f"{lora} sharding=fsdp", 2),
            ("lora", "one"): (train_argv, shapes_data, f"{lora} sharding=fsdp", 1),
            ("lora", "plain"): (train_argv, shapes_data, lora, 1),
            ("controlnet", "two"): (controlnet_argv, control, FSDP, 2),
            ("controlnet", "plain"): (controlnet_argv, control, "sample_images=0", 1)}
    started = []
    for (target, name), (make, data, udp, count) in runs.items():
        argv = [a for a in make(data, str(tmp_path / target / name), tiny_model_dir, "--epoch_num=1",
                                "--max_grad_norm=0.5", udp=udp) if not a.startswith("--micro_batch_size")]
        if count > 1:
            started.append(easynlp_process(_processes(argv, count)))
        else:
            _run(_processes(argv, 1), 1)
    for process in started:
        finished_output(process)

    def weights(target, name):
        return load_file(os.path.join(tmp_path, target, name, "last", {
            "lora": "pytorch_lora_weights.safetensors", "controlnet": "diffusion_pytorch_model.safetensors"}[target]))

    assert largest_difference(weights("lora", "two"), weights("lora", "one")) <= 1e-6
    assert largest_difference(weights("controlnet", "two"), weights("controlnet", "plain")) <= 1e-4
    sharded, unsharded = weights("lora", "two"), weights("lora", "plain")
    assert all(sharded[k].dtype == v.dtype == torch.float32 and sharded[k].shape == v.shape
               for k, v in unsharded.items())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir)
    pipe.load_lora_weights(str(tmp_path / "lora" / "two"))
    assert pipe.get_list_adapters() == {"unet": ["default_0"]}


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
