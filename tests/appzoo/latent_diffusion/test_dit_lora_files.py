"""LoRA files of Z-Image and Qwen-Image that other tools write and read (issue 32): lora= reads a LoRA in ComfyUI's
key layout (``diffusion_model.<module>.lora_A/lora_B`` with its ``alpha``, which diffusers' converters take) to
the image of the same adapter in diffusers' own file."""

import os

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from easynlp_ldm import cli
from modelzoo import families
from modelzoo.families.dit import ATTENTION_TARGETS
from modelzoo.formats.comfyui_lora import diffusers_to_comfyui, transformer_config
from modelzoo.lora import LORA_FILE
from modelzoo.tiny_dit import make_tiny_qwenimage_model, make_tiny_zimage_model
from tests.helpers import decode, predict_argv, random_adapter, read_rows

MAKERS = {"zimage": make_tiny_zimage_model, "qwenimage": make_tiny_qwenimage_model}
# The family's own guidance off: the images then differ by the adapter alone.
GUIDANCE = {"zimage": "scale=0", "qwenimage": "true_cfg_scale=1"}
BY_HAND = {"zimage": dict(guidance_scale=0.0), "qwenimage": {}}
TOLERANCE = 1  # of 255


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {name: make(str(root / name)) for name, make in MAKERS.items()}


def make_dit_adapter(model_dir, folder, seed=1, rank=4, alpha=8):
    """A LoRA of the tiny transformer's attention with random (non-zero) up-projections, saved as train_target=lora
    saves one; alpha ≠ rank, so a file that lost the adapter's alpha gives another image."""
    return random_adapter(families.load(model_dir), folder, ATTENTION_TARGETS, seed, rank, alpha)


@pytest.fixture(scope="module")
def adapters(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {name: make_dit_adapter(folder, str(root / name)) for name, folder in folders.items()}


def predicted(tmp_path, folder, udp):
    table, out = tmp_path / "prompts.tsv", tmp_path / "out.tsv"
    table.write_text("0\t一个红色的圆形\n", encoding="utf-8")
    argv = predict_argv(table, out, folder, udp=f"ddim_steps=2 n_samples=1 optimize=none {udp}")
    assert cli.main(argv) == 0
    [(_, _, image)] = read_rows(out)
    return decode(image)


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_lora_reads_comfyui_layout_as_the_diffusers_file(folders, adapters, tmp_path, name):
    pipeline_class = type(DiffusionPipeline.from_pretrained(folders[name], local_files_only=True))
    tensors, metadata = pipeline_class.lora_state_dict(os.path.join(adapters[name], LORA_FILE),
                                                       return_lora_metadata=True)
    comfyui = diffusers_to_comfyui(tensors, transformer_config(metadata))
    assert all(key.startswith("diffusion_model.") for key in comfyui)
    comfyui_file = str(tmp_path / "comfyui_lora.safetensors")
    save_file(comfyui, comfyui_file)  # no metadata: the alpha travels in the file's .alpha keys

    plain = predicted(tmp_path, folders[name], GUIDANCE[name])
    adapted = predicted(tmp_path, folders[name], f"{GUIDANCE[name]} lora={adapters[name]}")
    from_comfyui = predicted(tmp_path, folders[name], f"{GUIDANCE[name]} lora={comfyui_file}")
    assert np.abs(adapted - plain).max() > 10  # the adapter moves pixels
    assert np.abs(from_comfyui - adapted).max() <= TOLERANCE


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_diffusers_export_with_lora_merged_predicts_the_lora_image(folders, adapters, tmp_path, name):
    exported = str(tmp_path / "exported")
    argv = ["--mode=export", f"--checkpoint_dir={folders[name]}", f"--outputs={exported}",
            f"--user_defined_parameters=export_format=diffusers lora={adapters[name]}"]
    assert cli.main(argv) == 0
    assert families.family_of(families.load(exported)).name == name
    pipe = DiffusionPipeline.from_pretrained(exported, local_files_only=True)
    assert not any("lora" in key for key in pipe.transformer.state_dict())  # merged, no adapter layers left
    adapted = predicted(tmp_path, folders[name], f"{GUIDANCE[name]} lora={adapters[name]}")
    assert np.abs(predicted(tmp_path, exported, GUIDANCE[name]) - adapted).max() <= TOLERANCE


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_comfyui_lora_export_loads_back_through_diffusers_to_the_same_image(folders, adapters, tmp_path, name):
    from safetensors import safe_open

    written = str(tmp_path / "comfyui.safetensors")
    argv = ["--mode=export", f"--checkpoint_dir={folders[name]}", f"--outputs={written}",
            f"--user_defined_parameters=lora={adapters[name]} lora_format=comfyui"]
    assert cli.main(argv) == 0
    with safe_open(written, framework="pt") as handle:
        keys = list(handle.keys())
    assert keys and all(key.startswith("diffusion_model.") and key.endswith((".lora_A.weight", ".lora_B.weight",
                                                                               ".alpha")) for key in keys)

    def image(pipe):
        return (pipe("一个红色的圆形", height=32, width=32, num_inference_steps=2, output_type="np",
                     generator=torch.Generator().manual_seed(7), **BY_HAND[name]).images[0] * 255).round()

    pipe = DiffusionPipeline.from_pretrained(folders[name], local_files_only=True)
    pipe.load_lora_weights(adapters[name])
    expected = image(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(tmp_path), weight_name="comfyui.safetensors")
    assert np.abs(image(pipe) - expected).max() <= TOLERANCE


def test_comfyui_lora_export_is_refused_for_sd_models_and_for_several_loras(folders, adapters, tmp_path,
                                                                            tiny_model_dir, capsys):
    out = str(tmp_path / "out.safetensors")
    for model, udp, message in (
            (tiny_model_dir, f"lora={adapters['zimage']} lora_format=comfyui", "lora_format=comfyui is not available"),
            (folders["zimage"], f"lora={adapters['zimage']},{adapters['zimage']} lora_format=comfyui",
             "give lora= one LoRA file")):
        assert cli.main(["--mode=export", f"--checkpoint_dir={model}", f"--outputs={out}",
                         f"--user_defined_parameters={udp}"]) != 0
        assert message in capsys.readouterr().err
        assert not os.path.exists(out)
