"""CLIP score as torchmetrics' ``CLIPScore`` defines it: 100 × the cosine of the L2-normalised image and text
embeddings, floored at 0, per image (Hessel et al. 2021 without their 2.5 weight), here for Chinese prompts through
a Chinese-CLIP, AltCLIP or CLIP checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from modelzoo.image_metrics.clip_models import ClipEmbedder


class ClipScorer:
    """``ClipScorer(folder)(images, prompts) -> [score per image]`` from a local transformers ``ChineseCLIPModel``,
    ``AltCLIPModel`` or ``CLIPModel`` folder and its processor (or the one in ``processor``)."""

    def __init__(self, folder: str, *, processor: str | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 32):
        self.folder = folder
        self.embedder = ClipEmbedder(folder, parameter="clip_model", processor=processor, device=device,
                                     batch_size=batch_size)

    def __call__(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        return (100 * self.embedder.cosines(images, prompts)).clamp(min=0).tolist()
