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


Size = tuple[int, int]  # (width, height) in pixels


def preprocess_image(image: Image.Image, size: int | Size, *, random_crop: bool = False, random_flip: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Resized (bilinear) to cover ``size`` (a square side, or (width, height): an aspect-ratio bucket) with the
    aspect ratio kept, the excess cropped (centre, or a seeded random position), a seeded flip; CHW float in
    [-1, 1]."""
    target_w, target_h = (size, size) if isinstance(size, int) else size
    width, height = image.size
    scale = max(target_w / width, target_h / height)
    new_w, new_h = max(target_w, round(width * scale)), max(target_h, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.BILINEAR)
    if random_crop:
        top = int(torch.randint(0, new_h - target_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, new_w - target_w + 1, (1,), generator=generator))
    else:
        top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    image = image.crop((left, top, left + target_w, top + target_h))
    if random_flip and float(torch.rand(1, generator=generator)) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------------ aspect-ratio buckets

MAX_BUCKET_RATIO = 2  # bucket sides between resolution / 2 and resolution × 2: aspect ratios up to 4:1 (kohya's)
SMALL_IMAGE_SCALE = 2.0  # an image upscaled more than this (each side) to its training size is "small"


def bucket_sizes(resolution: int, step: int) -> list[Size]:
    """Training sizes of about ``resolution``² pixels (never more) for aspect ratios from 1:4 to 4:1: for each width
    (a multiple of ``step``, the model's downsampling factor), the tallest height that keeps the area; widest
    last. The square ``resolution``² is always one of them."""
    low = max(step, resolution // MAX_BUCKET_RATIO // step * step)
    high = resolution * MAX_BUCKET_RATIO
    area = resolution * resolution
    sizes = {(resolution, resolution)}
    for width in range(low, high + 1, step):
        height = min(high, area // width // step * step)
        if height >= low:
            sizes.add((width, height))
    return sorted(sizes, key=lambda s: s[0] / s[1])


def choose_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the image's (in log ratio: 2:1 is as far from 1:1 as 1:2); of equal
    ones, the larger."""
    ratio = np.log(width / height)
    return min(buckets, key=lambda b: (abs(np.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def kept_share(width: int, height: int, bucket: Size) -> float:
    """The share of an image's pixels that its bucket keeps (the rest is the crop)."""
    scale = max(bucket[0] / width, bucket[1] / height)
    return bucket[0] * bucket[1] / (width * scale * height * scale)


def is_small(width: int, height: int, bucket: Size) -> bool:
    return max(bucket[0] / width, bucket[1] / height) > SMALL_IMAGE_SCALE


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
    sizes: list[Size]  # each image's (width, height) as decoded

    def __len__(self) -> int:
        return len(self.captions)

    def read_image(self, index: int, column: str | None = None) -> Image.Image:
        """Row ``index``'s image (or the image in ``column``, e.g. a ControlNet's conditioning image)."""
        with open(self.path, "rb") as handle:
            handle.seek(self.offsets[index])
            raw = handle.readline()
        try:
            return decode_image_base64(parse_line(raw, self.schema)[column or self.image_column])
        except BadRow as bad:  # validated at indexing time; the file changed under us
            raise UserError(f"{self.path}, line {self.line_numbers[index]}: {bad.reason} (the file changed during "
                            f"training)") from None


def index_table(path: str, inputs: InputTables, policy: BadRowPolicy, on_image=None, accept=None,
                extra_images: tuple[str, ...] = ()) -> IndexedTable:
    """One validating pass over ``path`` (one of ``inputs.tables``): every image is decoded once (bad rows are found
    now, not mid-training). ``accept(line_number, image)``, when given, may leave a good row out (False);
    ``on_image(index, image)`` sees each row kept (for latent caching). ``extra_images``: other image columns
    validated in the same pass (a ControlNet's conditioning images)."""
    schema, text_column, image_column = inputs.schema, inputs.text_column, inputs.image_column
    offsets: list[int] = []
    with open(path, "rb") as handle:
        position = 0
        for raw in handle:
            offsets.append(position)
            position += len(raw)
    captions, kept_offsets, lines, sizes = [], [], [], []
    for row in read_table(path, schema, skip_first_line=inputs.skip_first_line, policy=policy,
                          image_columns=[image_column, *extra_images]):
        image = row[image_column]
        if accept is not None and not accept(row.line_number, image):
            continue
        if on_image is not None and not policy.stopping:  # the run stops after this pass: only find the bad rows
            on_image(len(captions), image)
        captions.append(str(row[text_column]))
        kept_offsets.append(offsets[row.line_number - 1])
        lines.append(row.line_number)
        sizes.append(image.size)
    return IndexedTable(path, schema, text_column, image_column, captions, kept_offsets, lines, sizes)
