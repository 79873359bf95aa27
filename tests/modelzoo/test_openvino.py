"""optimize=openvino (what auto does on CPU): same images as fp32 PyTorch, IR converted once per model and reused
from disk, static compiles per batch shape, PyTorch for the calls it cannot take, thread budget from cgroups."""

import os

import numpy as np
import pytest
import torch

from appzoo.latent_diffusion.generation import Generator
from appzoo.latent_diffusion.settings import GenerationSettings
from modelzoo.families import sd
from modelzoo.optimize import prepare_for_inference, resolve_level

pytest.importorskip("openvino")

PROMPTS = ["红色的圆形", "蓝色的正方形", "黄色的三角形", "绿色的圆形"]


def images(model, seeds=(1, 2, 3, 4), prompts=PROMPTS):
    generate = Generator(model, GenerationSettings(steps=4))
    return [np.asarray(im, dtype=np.float64) for im in generate(list(prompts), list(seeds))]


def psnr(a, b):
    mse = np.mean((a - b) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture
def ov_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EASYNLP_OPENVINO_CACHE", str(tmp_path / "ov"))
    return tmp_path / "ov"


def test_openvino_fp32_gives_the_images_of_none_and_reuses_the_cached_ir(tiny_model_dir, ov_cache):
    reference = images(prepare_model(tiny_model_dir, "none"))
    model = prepare_model(tiny_model_dir, "openvino", "fp32")
    assert model.optimization["openvino"] == ["unet", "vae.decoder"] and model.optimization["dtype"] == "float32"
    out = images(model)
    assert min(psnr(a, b) for a, b in zip(out, reference)) >= 40  # fp32 both: the same pictures
    unet_runner = model.unet.forward.openvino_runner
    decoder_runner = model.vae.decoder.forward.openvino_runner
    assert (unet_runner.conversions, decoder_runner.conversions) == (1, 1)
    assert os.path.isfile(unet_runner.ir_path) and os.path.isfile(decoder_runner.ir_path)
    # another batch size: a new static compile of the same IR, no new conversion
    images(model, seeds=(5, 6), prompts=PROMPTS[:2])
    assert unet_runner.conversions == 1 and len(unet_runner.compiled) == 2
    # a new process (here: a fresh load) finds the IR on disk and converts nothing
    again = prepare_model(tiny_model_dir, "openvino", "fp32")
    assert np.array_equal(images(again)[0], out[0])
    assert again.unet.forward.openvino_runner.conversions == 0


def test_changed_weights_get_their_own_ir(tiny_model_dir, ov_cache):
    first = prepare_model(tiny_model_dir, "openvino", "fp32").unet.forward.openvino_runner.key
    model = sd.load(tiny_model_dir)
    with torch.no_grad():
        model.unet.conv_out.bias += 0.01  # a fine-tune or a merged LoRA changes weights: never a stale IR
    prepare_for_inference(model, "openvino", "fp32")
    assert model.unet.forward.openvino_runner.key != first


def test_auto_on_cpu_is_openvino_within_the_quality_guard(tiny_model_dir, ov_cache):
    reference = images(prepare_model(tiny_model_dir, "none"))
    model = prepare_model(tiny_model_dir, "auto")
    assert model.optimization["ran_as"] == "openvino" and model.optimization["threads"] == torch.get_num_threads()
    assert min(psnr(a, b) for a, b in zip(images(model), reference)) >= 25  # bf16 where the CPU has it


def test_controlnet_calls_run_in_pytorch_and_match_none(tiny_model_dir, ov_cache, tmp_path):
    # a ControlNet hands the UNet residuals, which the converted graph has no inputs for: such calls run in the
    # PyTorch UNet (fp32), so the images equal optimize=none's, and nothing more is converted
    from appzoo.latent_diffusion.conditioning import ImageInputs
    from tests.helpers import make_test_controlnet, photo

    controlnet = make_test_controlnet(tiny_model_dir, str(tmp_path / "controlnet"))
    settings = GenerationSettings(steps=4, controlnets=((controlnet, 0.8),))
    inputs = ImageInputs(controls=[[photo(40), photo(41)]])
    out = {}
    for level in ("none", "openvino"):
        model = prepare_model(tiny_model_dir, level, "fp32")
        out[level] = [np.asarray(im, dtype=np.int16) for im in Generator(model, settings)(PROMPTS[:2], [1, 2],
                                                                                           inputs=inputs)]
    assert all(np.abs(a - b).max() <= 3 for a, b in zip(out["openvino"], out["none"]))
    assert model.unet.forward.openvino_runner.conversions == 0 and not model.unet.forward.openvino_runner.compiled


def test_levels_resolve_by_device_and_model(monkeypatch):
    from modelzoo import openvino_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_level("auto", cpu)[0] == "openvino" and resolve_level("max", cpu)[0] == "openvino"
    assert resolve_level("auto", cuda)[0] == "torch" and resolve_level("max", cuda)[0] == "compile"
    assert resolve_level("auto", cpu, switchable=True)[0] == "torch"
    monkeypatch.setattr(openvino_backend, "available", lambda: False)
    assert resolve_level("auto", cpu) == ("torch", "the openvino package is not installed")
    assert resolve_level("torch", cpu) == ("torch", "")


def test_precision_the_cpu_lacks_is_a_clear_error(tiny_model_dir, ov_cache, monkeypatch):
    from modelzoo import openvino_backend

    monkeypatch.setattr(openvino_backend, "cpu_precisions", lambda: {"fp32"})
    with pytest.raises(ValueError, match="precision=bf16 is not supported by OpenVINO on this CPU"):
        prepare_model(tiny_model_dir, "openvino", "bf16")


def prepare_model(model_dir, level, precision=""):
    model = sd.load(model_dir)
    prepare_for_inference(model, level, precision)
    return model


@pytest.mark.parametrize("batch", [1, 3, 4])
def test_a_batch_runs_as_parallel_streams_with_the_same_result(ov_cache, batch):
    # one OpenVINO stream per thread, each on its part of the batch (steady on a shared CPU); uneven and tiny batches
    # too; the result is the module's, sample by sample
    from modelzoo.openvino_backend import OpenVINORunner

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                              torch.nn.Conv2d(8, 4, 3, padding=1)).eval()
    runner = OpenVINORunner(net, "net", "test-streams", "fp32", threads=2, streams=2)
    x = torch.randn(batch, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), net(x), rtol=1e-4, atol=1e-4)
    # images per part: an uneven split compiles two part shapes, an even one runs one in two requests
    assert [shapes[0][0] for shapes, _ in runner.compiled] == {1: [1], 3: [2, 1], 4: [2]}[batch]


def test_the_runner_keeps_its_most_recent_shapes_and_releases_the_others(ov_cache):
    # issue 30, item 8: every new request shape used to keep its compiled models (their memory and stream threads)
    # for ever; now the least recently used is released before another is compiled, and the blobs on disk are pruned
    from modelzoo import openvino_backend
    from modelzoo.openvino_backend import OpenVINORunner

    def threads():
        return len(os.listdir("/proc/self/task"))

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3, padding=1), torch.nn.SiLU(),
                              torch.nn.Conv2d(16, 4, 3, padding=1)).eval()
    runner = OpenVINORunner(net, "net", "test-lru", "fp32", threads=2, streams=2, max_shapes=2)

    def run(side, batch=2):  # 2 images in 2 streams: one compiled model (1 image), run as two requests
        x = torch.randn(batch, 4, side, side)
        with torch.no_grad():
            torch.testing.assert_close(runner(x), net(x), rtol=1e-4, atol=1e-4)
        return (((1, 4, side, side),), 2)

    first, second = run(8), run(16)
    at_bound = threads()
    run(8)  # used again: now the most recent
    later = [run(side) for side in (24, 32, 40)]
    assert list(runner.compiled) == later[-2:] and runner.evictions == 3
    run(8)  # released, so compiled again
    assert list(runner.compiled) == [later[-1], first] and second not in runner.compiled
    assert threads() <= at_bound + 1  # released models' threads are reused, not added to
    blobs = os.listdir(runner.blob_dir)
    assert 0 < len(blobs) <= openvino_backend.BLOBS_PER_SHAPE * 2
    runner.resize(1)
    assert list(runner.compiled) == [first]
    # an uneven split needs two compiled models at once (kept for the call even past max_shapes=1); a batch of 4
    # then reuses the part of 2
    run(8, batch=3)
    assert [shapes[0][0] for shapes, _ in runner.compiled] == [2, 1]
    run(8, batch=4)
    assert [shapes[0][0] for shapes, _ in runner.compiled] == [2] and runner.evictions == 6


def test_a_conversion_sends_no_telemetry_and_forks_nothing(ov_cache, tmp_path, monkeypatch):
    # OpenVINO's converter sent usage data from forked processes (offline, they could hang this process's exit)
    # and wrote a client id under ~/intel unless the user had opted out
    import multiprocessing

    from modelzoo.openvino_backend import OpenVINORunner

    monkeypatch.setenv("HOME", str(tmp_path))
    net = torch.nn.Conv2d(4, 4, 3, padding=1).eval()
    runner = OpenVINORunner(net, "net", "test-telemetry", "fp32", threads=1)
    with torch.no_grad():
        runner(torch.randn(1, 4, 8, 8))
    assert runner.conversions == 1
    assert multiprocessing.active_children() == [] and not (tmp_path / "intel").exists()
