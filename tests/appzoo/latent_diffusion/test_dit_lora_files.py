"""LoRA files of Z-Image and Qwen-Image that other tools write and read (issue 32): lora= reads a LoRA in ComfyUI's
key layout (``diffusion_model.<module>.lora_A/lora_B`` with its ``alpha``, which diffusers' converters take) to
the image of the same adapter in diffusers' own file."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from easynlp_ldm import cli
from modelzoo import families
from modelzoo.families.dit import ATTENTION_TARGETS
from modelzoo.formats.comfyui_lora import diffusers_to_comfyui, read_diffusers_lora
from modelzoo.lora import LORA_FILE, add_training_adapters, save_adapters
from modelzoo.tiny_dit import make_tiny_qwenimage_model, make_tiny_zimage_model
from tests.helpers import decode, predict_argv, read_rows

MAKERS = {"zimage": make_tiny_zimage_model, "qwenimage": make_tiny_qwenimage_model}
# The family's own guidance off: the images then differ by the adapter alone.
GUIDANCE = {"zimage": "scale=0", "qwenimage": "true_cfg_scale=1"}
TOLERANCE = 1  # of 255


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dit")
    return {name: make(str(root / name)) for name, make in MAKERS.items()}


def make_dit_adapter(model_dir, folder, seed=1, rank=4, alpha=8):
    """A LoRA of the tiny transformer's attention with random (non-zero) up-projections, saved as train_target=lora
    saves one; alpha ≠ rank, so a file that lost the adapter's alpha gives another image."""
    model = families.load(model_dir)
    add_training_adapters(model, rank, alpha, 0.0, ATTENTION_TARGETS, text_encoder=False)
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, param in model.transformer.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=generator)
        if param.requires_grad:
            weights["transformer." + name] = param.detach()
    save_adapters(folder, model, weights)
    return folder


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
    tensors, config = read_diffusers_lora(os.path.join(adapters[name], LORA_FILE))
    comfyui = diffusers_to_comfyui(tensors, config)
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
    from diffusers import DiffusionPipeline

    exported = str(tmp_path / "exported")
    argv = ["--mode=export", f"--checkpoint_dir={folders[name]}", f"--outputs={exported}",
            f"--user_defined_parameters=export_format=diffusers lora={adapters[name]}"]
    assert cli.main(argv) == 0
    assert families.family_of(families.load(exported)).name == name
    pipe = DiffusionPipeline.from_pretrained(exported, local_files_only=True)
    assert not any("lora" in key for key in pipe.transformer.state_dict())  # merged, no adapter layers left
    adapted = predicted(tmp_path, folders[name], f"{GUIDANCE[name]} lora={adapters[name]}")
    assert np.abs(predicted(tmp_path, exported, GUIDANCE[name]) - adapted).max() <= TOLERANCE
