"""A CLIP-style checkpoint folder (``ChineseCLIPModel``, ``AltCLIPModel`` or ``CLIPModel`` with its processor)
loaded through transformers, and its L2-normalised image and text embeddings; nothing is downloaded."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch
from PIL import Image

from easynlp_ldm.errors import UserError

# model_type in config.json → the transformers class that holds both towers
CLIP_CLASSES = {"chinese_clip": "ChineseCLIPModel", "altclip": "AltCLIPModel", "clip": "CLIPModel"}


def _model_type(folder: str, parameter: str) -> str:
    config_path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise UserError(f"{parameter}={folder}: folder not found; give a local Chinese-CLIP, AltCLIP or CLIP folder "
                        "(transformers' save_pretrained layout: config.json, weights, processor files)")
    if not os.path.isfile(config_path):
        raise UserError(f"{parameter}={folder}: no config.json; give a transformers CLIP-style model folder")
    try:
        with open(config_path, encoding="utf-8") as file:
            model_type = json.load(file).get("model_type")
    except (OSError, ValueError, AttributeError) as err:
        raise UserError(f"{config_path}: not a readable JSON config ({err})") from None
    if model_type not in CLIP_CLASSES:
        raise UserError(f"{parameter}={folder}: model_type {model_type!r} is not a CLIP-style model; use a "
                        f"{', '.join(CLIP_CLASSES.values())} folder")
    return model_type


class ClipEmbedder:
    """A CLIP-style folder's two towers and processor (from ``processor`` where the model folder has none, as
    PickScore_v1 is used with laion/CLIP-ViT-H-14-laion2B-s32B-b79K's); ``images()`` and ``texts()`` return
    unit-length embeddings, text truncated to the model's maximum length."""

    def __init__(self, folder: str, *, allowed=tuple(CLIP_CLASSES), parameter: str = "clip_model",
                 processor: str | None = None, device: str | torch.device = "cpu", batch_size: int = 32):
        import transformers
        from transformers import AutoProcessor

        model_type = _model_type(folder, parameter)
        if model_type not in allowed:
            raise UserError(f"{parameter}={folder}: model_type {model_type!r} is not supported here; use a "
                            f"{', '.join(CLIP_CLASSES[kind] for kind in allowed)} folder")
        model_class = getattr(transformers, CLIP_CLASSES[model_type])
        try:
            self.model = model_class.from_pretrained(folder).eval().requires_grad_(False)
        except (OSError, ValueError) as err:
            reason = str(err).strip().split("\n")[0][:200]
            raise UserError(f"{parameter}={folder}: cannot load the {CLIP_CLASSES[model_type]} ({reason})") from None
        processor_folder = processor or folder
        # transformers 4 saves the image settings in preprocessor_config.json, 5 in processor_config.json
        if not any(os.path.isfile(os.path.join(processor_folder, name))
                   for name in ("preprocessor_config.json", "processor_config.json")):
            raise UserError(f"{parameter}={folder}: no processor in {processor_folder} (preprocessor_config.json and "
                            "tokenizer files); copy them from the checkpoint's base model's folder")
        try:
            self.processor = AutoProcessor.from_pretrained(processor_folder)
        except (OSError, ValueError) as err:
            reason = str(err).strip().split("\n")[0][:200]
            raise UserError(f"{parameter}={folder}: cannot load the processor in {processor_folder} ({reason})") \
                from None
        self.device = torch.device(device)
        self.model.to(self.device)
        self.batch_size = batch_size
        self.max_length = self._max_text_length()

    def _max_text_length(self) -> int:
        text_config = self.model.config.text_config
        positions = text_config.max_position_embeddings
        if self.model.config.model_type == "altclip":
            positions -= 2  # XLM-R numbers positions from the padding id + 1
        return min(positions, self.processor.tokenizer.model_max_length)

    @staticmethod
    def _unit(features: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(features):  # transformers versions that return an output object
            features = features.pooler_output
        features = features.double()
        return features / features.norm(p=2, dim=-1, keepdim=True)

    @torch.inference_mode()
    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            parts.append(self._unit(self.model.get_image_features(pixel_values=pixels.to(self.device))))
        return torch.cat(parts).cpu()

    @torch.inference_mode()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        parts = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                              truncation=True, max_length=self.max_length, return_tensors="pt")
            tokens = {key: value.to(self.device) for key, value in tokens.items()}
            parts.append(self._unit(self.model.get_text_features(**tokens)))
        return torch.cat(parts).cpu()

    def cosines(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        """Cosine of each image with its own prompt (float64)."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not images:
            return torch.zeros(0, dtype=torch.float64)
        return (self.images(images) * self.texts(prompts)).sum(dim=-1)
