"""Tiny random models in the exact on-disk layout PAI publishes (for tests and benchmarks; never for pictures)."""

from __future__ import annotations

import json
import os

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from easynlp_ldm.files import atomic_torch_save, atomic_write_bytes, atomic_write_text

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_CHARS = ("一个的是在有上下左右中间大小画图片背景红色绿色蓝色黄色紫色橙色白色黑色灰色圆形正方形三角形星形"
              "请只和张幅里面位于角落测试文本猫狗山水")


def write_vocab(path: str, chars: str = TINY_CHARS) -> list[str]:
    vocab = SPECIAL_TOKENS + sorted(set(chars)) + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    atomic_write_text(path, "".join(token + "\n" for token in vocab))
    return vocab


def make_tiny_diffusers_model(folder: str, *, seed: int = 0, image_size: int = 32, text_positions: int = 32,
                              weights: str = "bin", esrgan_state: dict | None = None, vae_factor: int = 2) -> str:
    """Write a tiny PAI-layout folder: BertTokenizer vocab.txt + CLIPTextModel + UNet + VAE (f=``vae_factor``, a
    power of 2; SD's is 8, which keeps large training sizes cheap) + DPM-Solver++ scheduler, weights as ``.bin`` (or
    ``safetensors``), built with the libraries' own ``save_pretrained``."""
    vae_blocks = vae_factor.bit_length()  # one more block than downsamplings
    if vae_factor < 2 or vae_factor & (vae_factor - 1):
        raise ValueError(f"vae_factor must be a power of 2 of at least 2, got {vae_factor}")
    torch.manual_seed(seed)
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    vocab = write_vocab(os.path.join(folder, "tokenizer", "vocab.txt"))
    atomic_write_text(os.path.join(folder, "tokenizer", "tokenizer_config.json"), json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": text_positions}))
    atomic_write_text(os.path.join(folder, "tokenizer", "special_tokens_map.json"), json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
         "mask_token": "[MASK]"}))
    safe = weights == "safetensors"
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=text_positions, pad_token_id=0, bos_token_id=2, eos_token_id=3))
    _save_transformers(text_encoder, os.path.join(folder, "text_encoder"), safe)
    latent = image_size // vae_factor
    unet = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    unet.save_pretrained(os.path.join(folder, "unet"), safe_serialization=safe)
    vae = AutoencoderKL(block_out_channels=(16,) * (vae_blocks - 1) + (32,),
                        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                        up_block_types=("UpDecoderBlock2D",) * vae_blocks, latent_channels=4, norm_num_groups=8,
                        sample_size=image_size)
    vae.save_pretrained(os.path.join(folder, "vae"), safe_serialization=safe)
    DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, algorithm_type="dpmsolver++", solver_order=2,
                                steps_offset=1).save_pretrained(os.path.join(folder, "scheduler"))
    atomic_write_text(os.path.join(folder, "model_index.json"), json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1", "feature_extractor": [None, None],
        "requires_safety_checker": False, "safety_checker": [None, None],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "BertTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"]}, indent=2))
    if esrgan_state is not None:
        atomic_torch_save(esrgan_state, os.path.join(folder, "RRDB_ESRGAN_x4.pth"))
    return folder


def _save_transformers(model, folder: str, safe: bool) -> None:
    os.makedirs(folder, exist_ok=True)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    atomic_write_text(os.path.join(folder, "config.json"), json.dumps(config, indent=2))
    # Weight names as PAI's folders hold them: saved by transformers 4.x, whose CLIPTextModel wraps everything in
    # ``text_model.`` (5.x dropped the wrapper and maps the old names on load).
    prefix = "text_model." if type(model).__name__ == "CLIPTextModel" and not hasattr(model, "text_model") else ""
    state = {prefix + k: v.contiguous() for k, v in model.state_dict().items()}
    if safe:
        from safetensors.torch import save

        atomic_write_bytes(os.path.join(folder, "model.safetensors"), save(state))
    else:
        atomic_torch_save(state, os.path.join(folder, "pytorch_model.bin"))
