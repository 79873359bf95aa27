"""Training data: TSV rows → validated, indexed examples → pixels or cached VAE latents + captions.

Every per-sample random choice (crop, flip, caption dropout, timestep, noise, the latent draw) comes from generators
seeded by (seed, epoch, sample index, stage), so a sample is the same whatever the batch, the process count, the
data-loader workers or an interruption and resume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from appzoo.latent_diffusion.inputs import InputTables
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import BadRow, BadRowPolicy, Column, decode_image_base64, parse_line, read_table

logger = logging.getLogger("easynlp.data")

PIXEL_STAGE, TRAIN_STAGE = 0, 1


def sample_generator(seed: int, epoch: int, index: int, stage: int) -> torch.Generator:
    mixed = (((seed * 1_000_003 + epoch) * 1_000_033 + index) * 7 + stage) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def preprocess_image(image: Image.Image, resolution: int, *, random_crop: bool = False, random_flip: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Shorter side → ``resolution`` (bilinear), centre or seeded random crop, seeded flip; CHW float in [-1, 1]."""
    width, height = image.size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if random_crop:
        top = int(torch.randint(0, new_h - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - resolution + 1, (1,), generator=generator))
    else:
        top, left = (new_h - resolution) // 2, (new_w - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if random_flip and float(torch.rand(1, generator=generator)) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@dataclass
class IndexedTable:
    """Valid rows of a table: captions in memory, each row's byte offset for reading its image again."""

    path: str
    schema: list[Column]
    text_column: str
    image_column: str
    captions: list[str]
    offsets: list[int]
    line_numbers: list[int]

    def __len__(self) -> int:
        return len(self.captions)

    def read_image(self, index: int) -> Image.Image:
        with open(self.path, "rb") as handle:
            handle.seek(self.offsets[index])
            raw = handle.readline()
        try:
            return decode_image_base64(parse_line(raw, self.schema)[self.image_column])
        except BadRow as bad:  # validated at indexing time; the file changed under us
            raise UserError(f"{self.path}, line {self.line_numbers[index]}: {bad.reason} (the file changed during "
                            f"training)") from None


def index_table(path: str, inputs: InputTables, policy: BadRowPolicy, on_image=None) -> IndexedTable:
    """One validating pass over ``path`` (one of ``inputs.tables``): every image is decoded once (bad rows are found
    now, not mid-training). ``on_image(index, image)`` sees each good image (for latent caching)."""
    schema, text_column, image_column = inputs.schema, inputs.text_column, inputs.image_column
    offsets: list[int] = []
    with open(path, "rb") as handle:
        position = 0
        for raw in handle:
            offsets.append(position)
            position += len(raw)
    captions, kept_offsets, lines = [], [], []
    for row in read_table(path, schema, skip_first_line=inputs.skip_first_line, policy=policy,
                          image_columns=[image_column]):
        if on_image is not None and not policy.stopping:  # the run stops after this pass: only find the bad rows
            on_image(len(captions), row[image_column])
        captions.append(str(row[text_column]))
        kept_offsets.append(offsets[row.line_number - 1])
        lines.append(row.line_number)
    return IndexedTable(path, schema, text_column, image_column, captions, kept_offsets, lines)
