"""Qwen2-VL's processor for still images, built without torchvision: what Qwen-Image-Edit's pipeline reads its input
image with (the prompt's ``<|image_pad|>`` tokens and the vision tower's patches).

transformers' ``Qwen2VLProcessor`` takes a video processor as well, and ``Qwen2VLVideoProcessor`` is a torchvision
class: without torchvision it can neither be built nor read from a folder (and the only torchvision wheels here are
CUDA builds whose ops do not load against a CPU torch). The edit pipelines give it text and still images only, so this
processor leaves the video processor out and reads the images with ``Qwen2VLImageProcessorPil``, the PIL backend of
the same image processor. A folder's ``processor/`` is read and written in the layout diffusers' folders have it:
the tokenizer's files, ``preprocessor_config.json`` (the image processor) and the chat template.
"""

from __future__ import annotations

from transformers import AutoTokenizer, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


class StillImageQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` with an image processor and a tokenizer, and no video processor."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        """The parts as diffusers' folders hold them (``Qwen2VLProcessor.from_pretrained`` reads them back)."""
        return [*self.image_processor.save_pretrained(save_directory), *self.tokenizer.save_pretrained(save_directory)]


def load_processor(folder: str) -> StillImageQwen2VLProcessor:
    """The processor in ``folder`` (a model's ``processor/``): its tokenizer and its image processor's settings."""
    return StillImageQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil.from_pretrained(folder),
                                      tokenizer=AutoTokenizer.from_pretrained(folder))
