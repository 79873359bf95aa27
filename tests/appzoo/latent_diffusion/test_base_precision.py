"""base_precision=bf16 (issue 32): the frozen weights of a LoRA run (SD-1.x and Z-Image) in bf16, half their bytes,
the adapter trained and saved in fp32 in the layout of an fp32-base run, loading in diffusers to predict's lora=
image; the loss close to an fp32-base run's; --use_amp with it; the caches keyed apart; exact resume; the memory plan
counting 2 bytes per frozen parameter; a bad value or another train_target is a one-line error.

base_precision=int8|fp8|nf4 (issue 35): the same, the denoiser's linear weights quantised by torchao and its
convolutions per output channel (int8: ≤ 55 % of the bf16 bytes), the memory plan's bytes those of the quantised
tensors, and a missing torchao a one-line error naming the pip command."""

import glob
import os
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from appzoo.latent_diffusion import train
from easynlp_ldm import cli, memory
from easynlp_ldm.errors import UserError
from modelzoo import lowbit
from modelzoo.lora import LORA_FILE
from modelzoo.tiny_dit import make_tiny_zimage_model
from tests.helpers import (
    controlnet_argv,
    interrupt_after_first_checkpoint,
    logged_images,
    predicted_image,
    train_argv,
    with_control_column,
)

FAST = ["--micro_batch_size=8", "--warmup_proportion=0", "--max_grad_norm=0"]
LORA = "train_target=lora lora_rank=4 caption_dropout=0 use_ema=False sample_images=0"
STEPS, SEED, TOLERANCE = 2, 7, 3  # TOLERANCE: of 255


@pytest.fixture(scope="module")
def zimage_dir(tmp_path_factory):
    return make_tiny_zimage_model(str(tmp_path_factory.mktemp("dit") / "zimage"))


@pytest.fixture(scope="module")
def models(tiny_model_dir, zimage_dir):
    return {"sd": tiny_model_dir, "zimage": zimage_dir}


def _train(monkeypatch, data, run, model, *extra, udp=LORA, argv=train_argv):
    """Train (``argv``: a command line of train_argv's arguments); returns the run's task (its model as it trained)."""
    built = []

    def keep(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    build = train.build_task
    monkeypatch.setattr(train, "build_task", keep)
    assert cli.main(argv(data, run, model, *FAST, *extra, udp=udp)) == 0
    monkeypatch.setattr(train, "build_task", build)
    return built[-1]


@pytest.fixture(scope="module")
def runs(models, shapes_data, tmp_path_factory):
    """An fp32-base, a bf16-base and an int8-base LoRA run of each model, same settings: (task, run folder) per (model,
    precision), and the footprint the memory plan checked per ("plan", model, precision)."""
    from appzoo.latent_diffusion import memory_plan

    root = tmp_path_factory.mktemp("base_precision")
    result, planned = {}, []
    check = memory_plan.check
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(memory_plan, "check", lambda footprint, *a, **k: planned.append(footprint) or check(
            footprint, *a, **k))
        for name, folder in models.items():
            for precision in ("fp32", "bf16", "int8"):
                run = str(root / f"{name}-{precision}")
                task = _train(monkeypatch, shapes_data, run, folder, "--epoch_num=3", "--learning_rate=5e-2",
                              udp=f"{LORA} base_precision={precision}")
                result[name, precision] = task, run
                result["plan", name, precision] = planned[-1]
    return result


def _frozen_and_trained_bytes(task):
    parts = (task.model.vae, task.model.text_encoder, task.denoiser)  # a DiT run's text encoder has left: None
    params = [p for part in parts if part is not None for p in part.parameters()]
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    trained = {p.dtype for p in params if p.requires_grad}
    return frozen, trained


@pytest.mark.parametrize("name", ["sd", "zimage"])
def test_the_frozen_weights_take_half_the_bytes_and_the_adapter_trains_in_fp32(runs, name):
    (fp32_task, _), (bf16_task, _) = runs[name, "fp32"], runs[name, "bf16"]
    fp32_frozen, fp32_trained = _frozen_and_trained_bytes(fp32_task)
    bf16_frozen, bf16_trained = _frozen_and_trained_bytes(bf16_task)
    assert bf16_frozen * 2 == fp32_frozen
    assert fp32_trained == bf16_trained == {torch.float32}
    assert {p.dtype for p in bf16_task.denoiser.parameters() if not p.requires_grad} == {torch.bfloat16}


def _adapter_file(run):
    with safe_open(os.path.join(run, LORA_FILE), "pt") as handle:
        return handle.metadata(), {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("name", ["sd", "zimage"])
def test_the_adapter_is_saved_as_with_fp32_base_weights(runs, name, precision):
    (_, fp32_run), (_, bf16_run) = runs[name, "fp32"], runs[name, precision]
    files = {}
    for run in (fp32_run, bf16_run):
        files[run] = _adapter_file(run)
    (fp32_meta, fp32_state), (bf16_meta, bf16_state) = files[fp32_run], files[bf16_run]
    assert fp32_meta == bf16_meta
    assert fp32_state.keys() == bf16_state.keys()
    assert all(bf16_state[k].dtype == torch.float32 and bf16_state[k].shape == v.shape for k, v in fp32_state.items())


@pytest.mark.parametrize("name", ["sd", "zimage"])
def test_the_loss_is_close_to_the_fp32_base_runs(runs, name):
    """The validation loss (fixed noise) of each run's adapter as it trained, in its run's precision."""
    losses = {precision: runs[name, precision][0].validate() for precision in ("fp32", "bf16", "int8")}
    assert abs(losses["bf16"] - losses["fp32"]) <= 0.02 * losses["fp32"], losses
    assert abs(losses["int8"] - losses["fp32"]) <= 0.03 * losses["fp32"], losses


@pytest.mark.parametrize("precision", ["bf16", "int8"])
@pytest.mark.parametrize("name", ["sd", "zimage"])
def test_the_adapter_loads_in_diffusers_and_gives_predicts_lora_image(runs, models, tmp_path, name, precision):
    from diffusers import DiffusionPipeline

    _, run = runs[name, precision]
    udp, by_hand = ("scale=0", dict(guidance_scale=0.0)) if name == "zimage" else ("scale=5", dict(guidance_scale=5.0))
    plain, seed = predicted_image(models[name], tmp_path, udp, SEED, STEPS)
    adapted, seed_again = predicted_image(models[name], tmp_path, f"{udp} lora={run}", SEED, STEPS)
    assert seed == seed_again
    assert np.abs(adapted - plain).max() > 10  # it learnt something
    pipe = DiffusionPipeline.from_pretrained(models[name], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(run)
    expected = pipe("一个红色的圆形", height=32, width=32, num_inference_steps=STEPS, output_type="np",
                    generator=torch.Generator().manual_seed(seed), **by_hand).images[0]
    assert np.abs(adapted - (expected * 255).round().astype(np.int16)).max() <= TOLERANCE


def test_caches_of_bf16_encoders_are_keyed_apart_from_fp32_ones(runs):
    for name in ("sd", "zimage"):
        names = {precision: {os.path.basename(path) for path in glob.glob(
            os.path.join(runs[name, precision][1], "latent_cache", "*.pt"))} for precision in ("fp32", "bf16")}
        assert names["fp32"] and names["bf16"] and not names["fp32"] & names["bf16"], names


def test_with_use_amp_it_trains_under_autocast(tiny_model_dir, shapes_data, tmp_path, monkeypatch):
    from modelzoo import optimize

    monkeypatch.setattr(optimize, "cpu_supports_bf16", lambda: True)  # --use_amp stays on on any CPU
    run = str(tmp_path / "amp")
    task = _train(monkeypatch, shapes_data, run, tiny_model_dir, "--epoch_num=1", "--learning_rate=5e-2",
                  "--use_amp", udp=f"{LORA} base_precision=bf16")
    state = load_file(os.path.join(run, LORA_FILE))
    assert state and all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in state.values())
    assert max(float(v.abs().max()) for k, v in state.items() if ".lora.up." in k) > 0
    assert np.isfinite(task.validate())


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_an_interrupted_low_precision_base_run_resumes_to_the_same_adapter(tiny_model_dir, shapes_data, tmp_path,
                                                                           monkeypatch, precision):
    """The frozen weights are not in the training state: read again from the model folder in bf16 (and quantised
    again), as before."""
    common = [*FAST, "--learning_rate=1e-2", "--save_checkpoint_steps=3", "--epoch_num=2"]
    udp = f"train_target=lora lora_rank=2 caption_dropout=0.2 ema_decay=0.9 sample_images=0 base_precision={precision}"
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert cli.main(train_argv(shapes_data, straight, tiny_model_dir, *common, udp=udp)) == 0
    interrupt_after_first_checkpoint(monkeypatch, train_argv(shapes_data, resumed, tiny_model_dir, *common, udp=udp))
    assert cli.main(train_argv(shapes_data, resumed, tiny_model_dir, *common, udp=udp)) == 0
    a, b = (load_file(os.path.join(run, "last", LORA_FILE)) for run in (straight, resumed))
    assert a.keys() == b.keys() and max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.parametrize("precision", ["fp8", "nf4"])
def test_fp8_and_nf4_bases_train_the_adapter_of_the_bf16_layout(runs, models, shapes_data, tmp_path, monkeypatch,
                                                                precision):
    """torchao runs both on this CPU (fp8 dequantised for each matmul): the adapter trains and is saved as bf16's."""
    run = str(tmp_path / precision)
    task = _train(monkeypatch, shapes_data, run, models["zimage"], "--epoch_num=1", "--learning_rate=5e-2",
                  udp=f"{LORA} base_precision={precision}")
    assert np.isfinite(task.validate())
    (bf16_meta, bf16_state), (meta, state) = _adapter_file(runs["zimage", "bf16"][1]), _adapter_file(run)
    assert meta == bf16_meta and state.keys() == bf16_state.keys()
    assert all(state[k].dtype == torch.float32 and state[k].shape == v.shape for k, v in bf16_state.items())
    assert max(float(v.abs().max()) for k, v in state.items() if "lora_B" in k) > 0  # B starts at zero: it moved


def _frozen_tensor_bytes(task):
    """Bytes of the frozen weights as they are held (a quantised weight by its data and scales)."""
    parts = [part for part in (task.model.vae, task.model.text_encoder, task.denoiser) if part is not None]
    trained = sum(p.numel() * p.element_size() for part in parts for p in part.parameters() if p.requires_grad)
    return sum(lowbit.tensor_bytes(part) for part in parts) - trained


@pytest.mark.parametrize("name", ["sd", "zimage"])
def test_int8_quantises_the_denoisers_linear_weights(runs, name):
    """The frozen denoiser's bytes (its adapters left out), its linear layers and convolutions quantised: ≤ 55 % of
    bf16's."""
    (bf16_task, _), (int8_task, _) = runs[name, "bf16"], runs[name, "int8"]
    adapters = sum(p.numel() * 4 for p in bf16_task.denoiser.parameters() if p.requires_grad)
    bf16, int8 = (lowbit.tensor_bytes(task.denoiser) - adapters for task in (bf16_task, int8_task))
    assert int8 <= 0.55 * bf16, (int8, bf16)
    _, trained = _frozen_and_trained_bytes(int8_task)
    assert trained == {torch.float32}


@pytest.mark.parametrize("name", ["sd", "zimage"])
def test_the_memory_plan_counts_two_bytes_per_frozen_parameter_and_int8s_quantised_bytes(runs, name):
    footprint = memory.ModelFootprint(trained={}, frozen={"unet": 1 << 20, "vae": 1 << 10})
    settings = memory.MemorySettings(micro_batch_size=1, resolution=32, gradient_checkpointing=False, use_amp=False,
                                     optimizer="adamw", use_ema=False, ema_device="", save_optimizer=False,
                                     device="cuda")
    fp32 = memory.estimate(footprint, settings)
    bf16 = memory.estimate(memory.ModelFootprint(trained={}, frozen=footprint.frozen, frozen_param_bytes=2), settings)
    assert bf16.parts["weights"] * 2 == fp32.parts["weights"] == 4 * footprint.frozen_count
    assert bf16.parts["save_copy"] * 2 == fp32.parts["save_copy"]
    assert "M frozen at 2 bytes each" in bf16.describe() and "bytes each" not in fp32.describe()

    planned = [runs["plan", name, precision] for precision in ("fp32", "bf16", "int8")]
    fp32_plan, bf16_plan, int8_plan = (footprint.frozen_bytes for footprint in planned)
    assert [fp32_plan, bf16_plan] == [4 * planned[0].frozen_count, 2 * planned[0].frozen_count]
    int8_held = _frozen_tensor_bytes(runs[name, "int8"][0])
    assert int8_plan < bf16_plan and abs(int8_plan - int8_held) <= 0.01 * int8_held, (int8_plan, int8_held)


def test_an_int8_base_controlnet_run_trains_the_controlnet_of_an_fp32_base_runs_files(tiny_model_dir, shapes_data,
                                                                                      tmp_path, monkeypatch):
    """train_target=controlnet base_precision=int8: the frozen UNet quantised (≤ 55 % of its bf16 bytes), the
    ControlNet trained and saved in fp32 as with fp32 base weights; its sample images drawn between the bf16 models."""
    from appzoo.latent_diffusion import memory_plan

    data = with_control_column(shapes_data, str(tmp_path / "data"))
    tasks, states, planned = {}, {}, {}
    check = memory_plan.check
    for precision in ("fp32", "int8"):
        run = str(tmp_path / precision)
        udp = (f"caption_dropout=0 use_ema=False sample_images={int(precision == 'int8')} sample_steps=2 "
               f"base_precision={precision}")
        monkeypatch.setattr(memory_plan, "check", lambda footprint, *a, name=precision, **k: planned.setdefault(
            name, footprint) and check(footprint, *a, **k))
        tasks[precision] = _train(monkeypatch, data, run, tiny_model_dir, "--epoch_num=1", udp=udp,
                                  argv=controlnet_argv)
        states[precision] = load_file(os.path.join(run, "diffusion_pytorch_model.safetensors"))
    # The memory plan offers a ControlNet run the lower precisions, the quantised UNet whole in every process
    quantised = lowbit.quantised_count(tasks["int8"].model.unet, "int8")
    assert quantised and planned["int8"].frozen_whole == quantised
    options = {option: whole for option, _, whole in planned["fp32"].precision_options}
    assert options["base_precision=int8"] == quantised and options["base_precision=bf16"] == 0
    assert logged_images(str(tmp_path / "int8"))  # drawn by the fp32 ControlNet between the bf16 models
    fp32, int8 = states["fp32"], states["int8"]
    assert fp32.keys() == int8.keys()
    assert all(int8[k].dtype == v.dtype == torch.float32 and int8[k].shape == v.shape for k, v in fp32.items())
    zero_convs = [v for k, v in int8.items() if "zero_conv" in k or "controlnet_mid_block" in k]
    assert zero_convs and all(float(v.abs().max()) > 0 for v in zero_convs)  # they start at zero: they moved
    assert all(torch.isfinite(v).all() for v in int8.values())
    assert np.isfinite(tasks["int8"].validate())
    bf16_bytes = lowbit.tensor_bytes(tasks["fp32"].model.unet) / 2
    assert lowbit.tensor_bytes(tasks["int8"].model.unet) <= 0.55 * bf16_bytes
    assert not any(p.requires_grad for p in tasks["int8"].model.unet.parameters())


@pytest.mark.parametrize("udp, message", [
    ("train_target=lora base_precision=fp16", "base_precision"),
    ("train_target=unet base_precision=bf16", "base_precision=bf16 applies to train_target=lora or controlnet"),
    ("train_target=vae base_precision=bf16", "base_precision=bf16 applies to train_target=lora or controlnet"),
    ("train_target=unet base_precision=int8", "base_precision=int8 applies to train_target=lora or controlnet"),
])
def test_a_bad_value_or_another_target_is_a_one_line_error(tiny_model_dir, shapes_data, tmp_path, capsys, udp,
                                                          message):
    assert cli.main(train_argv(shapes_data, str(tmp_path / "run"), tiny_model_dir, udp=udp)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_without_torchao_a_low_bit_base_is_a_one_line_error_naming_the_pip_command(tiny_model_dir, shapes_data,
                                                                                    tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # import torchao.quantization: ImportError
    argv = train_argv(shapes_data, str(tmp_path / "run"), tiny_model_dir, udp=f"{LORA} base_precision=nf4")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and lowbit.TORCHAO_INSTALL in err[0], err


def test_fp8_on_a_gpu_before_ada_is_a_one_line_error_naming_what_runs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(UserError, match="compute capability 8.9 or later .*use int8 or nf4") as error:
        lowbit.check_supported("fp8", torch.device("cuda"))
    assert "\n" not in str(error.value)
    lowbit.check_supported("int8", torch.device("cuda"))
