"""A human-preference score in PickScore's way (Kirstain et al. 2023, yuvalkirstain/PickScore_v1): a CLIP checkpoint
fine-tuned on human choices, used through transformers' ``CLIPModel`` and its processor; the score is the model's
``logit_scale.exp()`` × the cosine of image and prompt embeddings (about 20-23 for PickScore_v1).

ImageReward and HPSv2 are not offered: their packages pin what this toolkit cannot take (image-reward 1.5:
``timm==0.6.13``, ``fairscale==0.4.13`` and ``datasets``; hpsv2 1.2.0: ``protobuf<4``, ``pytest==7.2.0``,
torchvision).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from modelzoo.image_metrics.clip_models import ClipEmbedder


class PreferenceScorer:
    """``PreferenceScorer(folder)(images, prompts) -> [score per image]`` from a local PickScore-style ``CLIPModel``
    folder (e.g. yuvalkirstain/PickScore_v1); ``processor`` is the folder with the processor files where the model's
    has none (PickScore's authors load laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)."""

    def __init__(self, folder: str, *, processor: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        self.folder = folder
        self.embedder = ClipEmbedder(folder, allowed=("clip",), parameter="preference_model", processor=processor,
                                     device=device, batch_size=batch_size)
        self.scale = float(self.embedder.model.logit_scale.detach().double().exp())

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return (self.scale * self.embedder.cosines(images, prompts)).tolist()
