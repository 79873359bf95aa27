"""Randomly initialised models from a JSON preset (``configs/*.json``): the starting point for training from
scratch, and the model shape benchmarks run on."""

from __future__ import annotations

import json

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from modelzoo import text_encoder as te
from modelzoo.ldm import LatentDiffusion


def build_from_preset(preset_path: str, vocab_path: str, seed: int = 0) -> LatentDiffusion:
    with open(preset_path, encoding="utf-8") as handle:
        preset = json.load(handle)
    torch.manual_seed(seed)
    tokenizer = te.load_tokenizer(vocab_path, {"do_lower_case": True,
                                               "model_max_length": preset.get("text_max_length", 32)})
    text = dict(preset["text_encoder"]["config"])
    text.update(vocab_size=len(tokenizer.get_vocab()), pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    text_encoder = te.build_text_encoder(preset["text_encoder"]["class"], text)
    unet = UNet2DConditionModel(**preset["unet"])
    vae = AutoencoderKL(**preset["vae"])
    scheduler = dict(preset["scheduler"]["config"])
    scheduler["_class_name"] = preset["scheduler"]["class"]
    return LatentDiffusion(tokenizer, text_encoder, unet, vae, scheduler, image_size=preset.get("image_size"))
