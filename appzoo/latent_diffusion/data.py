"""The table path of training (and of evaluate's denoising loss): TSV rows → validated, indexed examples → images
→ aspect-ratio buckets → cached VAE latents (in memory and on disk) → pixel batches; for the families that train on a
text-embedding cache (``caches_text_embeddings``), each caption encoded once (``cached_text_embeddings``).

``read_training_data`` is the one call of ``--mode=train``: one validating pass over each table (every bad row found
and reported at once), each image given its bucket and, with cached latents, encoded by the frozen VAE as it is read
(or read back from the run's on-disk cache for exactly this table, VAE and preprocessing). ``PixelReader`` decodes
and preprocesses rows for the steps that need pixels.

Every per-sample random choice (crop, flip, caption dropout, timestep, noise, the latent draw) comes from generators
seeded by (seed, epoch, sample index, stage), so a sample is the same whatever the batch, the process count, the
data-loader workers or an interruption and resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from appzoo.latent_diffusion.inputs import InputTables
from appzoo.latent_diffusion.settings import TrainingSettings
from easynlp_ldm import distributed
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import (
    BadRow,
    BadRowPolicy,
    Column,
    decode_image_base64,
    parse_line,
    read_table,
    table_digest,
)
from modelzoo.families import family_of
from modelzoo.families.sd_memory import MAX_ENCODE_BATCH
from modelzoo.ldm import LatentDiffusion

logger = logging.getLogger("easynlp.train")  # the reading pass is the first part of a training run's log

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


# ------------------------------------------------------------------------------------------------ latent caches
class LatentCache:
    """Encodes images with the frozen VAE in batches and keeps the latent distribution's moments (mean, logvar).
    ``size_of(index, image)``: each image's training size (its aspect-ratio bucket; default the square
    ``resolution``); images of one size are encoded together. With ``use_amp`` the encoder runs under the same
    autocast as the training step, exactly as it would if the latents were not cached (and ~1.7× faster on CPU at
    256²). ``encoded`` counts the images encoded."""

    def __init__(self, model: LatentDiffusion, resolution: int, batch_size: int = 32, use_amp: bool = False,
                 size_of=None):
        self.model, self.resolution, self.batch_size = model, resolution, batch_size
        self.use_amp = use_amp
        self.size_of = size_of or (lambda index, image: (resolution, resolution))
        self.pending: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        self.done: dict[int, torch.Tensor] = {}
        self.encoded = 0
        self.channels_last = False

    def add(self, index: int, image) -> None:
        size = self.size_of(index, image)
        group = self.pending.setdefault(size, [])
        group.append((index, preprocess_image(image, size)))
        if len(group) >= self.batch_size:
            self._encode(size)

    @torch.no_grad()
    def _encode(self, size: tuple[int, int]) -> None:
        from easynlp_ldm.trainer import amp_dtype

        group = self.pending.pop(size, [])
        if not group:
            return
        device = self.model.vae.device
        pixels = torch.stack([pixels for _, pixels in group]).to(device, self.model.vae.dtype)
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=self.use_amp):
            moments = family_of(self.model).vae_moments(self.model, pixels).float().cpu()
        # The encoder's memory format (channels-last from oneDNN's convolutions on CPU) is kept for the batches: the
        # step then computes as it would on latents encoded in the step.
        self.channels_last = moments.dim() == 4 and not moments.is_contiguous() and moments.is_contiguous(
            memory_format=torch.channels_last)
        for (index, _), moment in zip(group, moments):
            self.done[index] = moment
        self.encoded += len(group)

    def flush(self) -> None:
        for size in list(self.pending):
            self._encode(size)

    def per_image(self) -> list[torch.Tensor]:
        """Every image's moments, in index order (shapes differ between buckets)."""
        self.flush()
        return [self.done[i] for i in sorted(self.done)]

    def cached(self) -> CachedLatents:
        return CachedLatents(self.per_image(), self.channels_last)

    def moments(self) -> torch.Tensor:
        """Every image's moments stacked (all of one size: the square ``resolution``)."""
        items = self.per_image()
        return torch.stack(items) if items else torch.empty(0)


class CachedLatents:
    """The cached moments of a table's images (one tensor per image: their bucket sizes differ), and the memory
    format the encoder gave them."""

    def __init__(self, moments: list[torch.Tensor], channels_last: bool = False):
        self.moments, self.channels_last = moments, channels_last

    def __len__(self) -> int:
        return len(self.moments)

    def batch(self, indices: list[int]) -> torch.Tensor:
        stacked = torch.stack([self.moments[i] for i in indices])
        return stacked.contiguous(memory_format=torch.channels_last) if self.channels_last else stacked


LATENT_CACHE_DIR = "latent_cache"


def module_digest(module: torch.nn.Module) -> str:
    """A digest of a module's weights (names, shapes, dtypes and bytes)."""
    digest = hashlib.blake2b()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


class DiskLatentCache:
    """A table's cached latents on disk, in ``<checkpoint_dir>/latent_cache/<key>.pt``, the key a digest of the
    table's bytes, the VAE's weights and every setting of the preprocessing and encoding (``key_parts``): a resumed
    or repeated run reads them instead of encoding every image again; any change is another key (older files of the
    same ``name`` are removed when a new one is written). Read with ``weights_only=True``."""

    def __init__(self, folder: str, name: str, key_parts: dict):
        key = hashlib.blake2b(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:24]
        self.folder, self.name = os.path.join(folder, LATENT_CACHE_DIR), name
        self.path = os.path.join(self.folder, f"{name}-{key}.pt")

    def load(self, count: int | None = None) -> CachedLatents | None:
        if not os.path.isfile(self.path):
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            cached = CachedLatents(list(saved["moments"]), bool(saved["channels_last"]))
        except Exception as err:  # a damaged file: encode again
            logger.warning("%s: unreadable (%s); encoding the images again", self.path, type(err).__name__)
            return None
        return cached if count is None or len(cached) == count else None

    def save(self, cached: CachedLatents) -> None:
        from easynlp_ldm.files import atomic_torch_save

        os.makedirs(self.folder, exist_ok=True)
        atomic_torch_save({"moments": [m.contiguous() for m in cached.moments],
                           "channels_last": cached.channels_last}, self.path)
        for name in os.listdir(self.folder):  # the same table's caches for other settings: stale
            if name.startswith(self.name + "-") and name != os.path.basename(self.path):
                os.remove(os.path.join(self.folder, name))


def read_and_encode(path: str, name: str, inputs: InputTables, policy: BadRowPolicy, model: LatentDiffusion,
                    flags: ParsedFlags, encode_batch: int, key: dict, size_of=None, accept=None,
                    extra_images: tuple[str, ...] = ()) -> tuple[IndexedTable, CachedLatents]:
    """The table indexed (its bad rows found) and its images' VAE latents: read from the run's on-disk latent cache
    when it holds them for exactly this table, VAE and preprocessing, else encoded now and written there."""
    disk = DiskLatentCache(flags.checkpoint_dir, name, {**key, "table": table_digest(path)})
    cached = disk.load()
    if cached is not None:
        table = index_table(path, inputs, policy, accept=accept, extra_images=extra_images)
        if len(cached) == len(table):
            logger.info("%s: latents of its %d images read from %s (none encoded)", path, len(table), disk.path)
            return table, cached
    cache = LatentCache(model, key["resolution"], encode_batch, use_amp=flags.use_amp,
                        size_of=(lambda index, image: size_of(image)) if size_of else None)
    table = index_table(path, inputs, policy, on_image=cache.add, accept=accept, extra_images=extra_images)
    cached = cache.cached()
    if not policy.stopping and distributed.context().is_main:
        disk.save(cached)
        logger.info("%s: %d images encoded; latents cached in %s", path, cache.encoded, disk.path)
    return table, cached


# ------------------------------------------------------------------------------------------- text embeddings
TEXT_ENCODE_BATCH = 16


def encoded_captions(model, captions: list[str], text_length: int) -> list[torch.Tensor]:
    """Each caption's text embedding by the family's ``encode_texts`` (no gradients, on the CPU), TEXT_ENCODE_BATCH
    captions per call."""
    family = family_of(model)
    return [embedding for start in range(0, len(captions), TEXT_ENCODE_BATCH)
            for embedding in family.encode_texts(model, captions[start:start + TEXT_ENCODE_BATCH], text_length)]


def cached_text_embeddings(model, captions: list[str], folder: str, text_length: int) -> dict[str, torch.Tensor]:
    """Each distinct caption encoded once by the frozen text encoder (the family's ``encode_texts``, as its pipeline
    encodes prompts), so that no training step runs it: read from ``<folder>/latent_cache/text-<key>.pt`` when it
    holds them for exactly these captions, this text encoder's weights and text length, else encoded now and written
    there (rank 0). Read with ``weights_only=True``."""
    from easynlp_ldm.files import atomic_torch_save

    family = family_of(model)
    unique = sorted(set(captions))
    key = {"family": family.name, "text_encoder": module_digest(model.text_encoder), "text_length": text_length,
           "device": model.device.type, "captions": hashlib.blake2b("\n".join(unique).encode()).hexdigest()}
    name = hashlib.blake2b(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(folder, LATENT_CACHE_DIR, f"text-{name}.pt")
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["captions"] == unique:
                logger.info("text embeddings of %d captions read from %s (none encoded)", len(unique), path)
                return dict(zip(unique, saved["embeddings"]))
        except Exception as err:  # a damaged file: encode again
            logger.warning("%s: unreadable (%s); encoding the captions again", path, type(err).__name__)
    embeddings = encoded_captions(model, unique, text_length)
    if distributed.context().is_main:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_torch_save({"captions": unique, "embeddings": [e.contiguous() for e in embeddings]}, path)
        for old in os.listdir(os.path.dirname(path)):  # embeddings of other captions or another encoder: stale
            if old.startswith("text-") and old != os.path.basename(path):
                os.remove(os.path.join(os.path.dirname(path), old))
    logger.info("%d captions encoded once by the text encoder; embeddings cached in %s", len(unique), path)
    return dict(zip(unique, embeddings))


# ------------------------------------------------------------------------------------------- the reading pass
class Buckets:
    """The aspect-ratio buckets of a run (``bucket=True``; otherwise the one square ``resolution``) and what the
    reading pass learns of the images: each image's bucket, the small ones (upscaled more than
    ``SMALL_IMAGE_SCALE``× to their size: warned about, or left out with skip_small_images) and the heavily cropped
    ones (beyond the 4:1 buckets)."""

    def __init__(self, model: LatentDiffusion, resolution: int, settings: TrainingSettings, path: str):
        self.resolution, self.path = resolution, path
        self.enabled = bool(settings.bucket)
        self.skip_small = bool(settings.skip_small_images)
        step = model.vae_scale_factor * 4  # latents a multiple of 4: ≥ 4 latent pixels per step of the UNet
        self.sizes = bucket_sizes(resolution, step) if self.enabled else [(resolution, resolution)]
        self.small: list[tuple[int, tuple[int, int]]] = []  # (line, image size)
        self.cropped: list[tuple[int, float]] = []  # (line, share of pixels kept), below 50 %

    def size_for(self, width: int, height: int) -> tuple[int, int]:
        return choose_bucket(width, height, self.sizes) if self.enabled else self.sizes[0]

    def size_of(self, image) -> tuple[int, int]:
        return self.size_for(*image.size)

    def accept(self, line_number: int, image) -> bool:
        size = self.size_of(image)
        kept = kept_share(*image.size, size)
        if kept < 0.5:
            self.cropped.append((line_number, kept))
        if is_small(*image.size, size):
            self.small.append((line_number, image.size))
            return not self.skip_small
        return True

    def report(self, sizes: list[tuple[int, int]]) -> None:
        counts = Counter(sizes)
        if self.enabled:
            logger.info("aspect-ratio buckets (width×height: images): %s", ", ".join(
                f"{w}×{h}: {counts[(w, h)]}" for w, h in sorted(counts, key=lambda s: s[0] / s[1])))
        if self.small:
            lines = ", ".join(str(line) for line, _ in self.small[:10]) + (" …" if len(self.small) > 10 else "")
            (w, h) = self.small[0][1]
            logger.warning("%s: %d images are far smaller than the training size (upscaled more than %g× per side; "
                           "lines %s; e.g. %d×%d); %s", self.path, len(self.small), SMALL_IMAGE_SCALE, lines, w, h,
                           "left out (skip_small_images=True)" if self.skip_small else
                           "they train as blurred upscales — pass skip_small_images=True to leave them out")
        if self.cropped:
            lines = ", ".join(str(line) for line, _ in self.cropped[:10]) + (" …" if len(self.cropped) > 10 else "")
            how = ("beyond the 4:1 aspect-ratio buckets" if self.enabled else
                   "by the square crop (bucket=True keeps most of each image)")
            logger.warning("%s: %d images lose more than half of their pixels %s (lines %s)", self.path,
                           len(self.cropped), how, lines)


BAD_ROWS_FILE = "bad_rows.tsv"


def report_bad_rows(policy: BadRowPolicy, out: str) -> None:
    """After the reading pass: every bad row in ``<checkpoint_dir>/bad_rows.tsv`` (the first ones on screen), then a
    stop — or, with skip_bad_rows, the count. A bad_rows.tsv of an earlier run is removed when there are none."""
    report = os.path.join(out, BAD_ROWS_FILE)
    if not distributed.context().is_main:
        policy.finish(None, logger.debug)  # rank 0 writes and shows; every rank stops alike
        return
    if not policy.total and os.path.isfile(report):
        os.remove(report)
    policy.finish(report, logger.warning)
    if policy.total:
        logger.warning("%s (listed in %s)", policy.summary(), report)


def check_reading_pass(policy: BadRowPolicy, out: str, train: IndexedTable, val: IndexedTable | None) -> None:
    """After the tables are read and before anything is built on them: the bad rows reported (a stop, unless
    skipping them), then a table left without rows is an error naming it."""
    report_bad_rows(policy, out)
    for table, use in ((train, "train"), (val, "validate")):
        if table is not None and not len(table):
            raise UserError(f"{table.path}: no rows left to {use} on (the table has no data rows, or every row was "
                            f"left out: see the lines above)")


CONTROL_COLUMN = "control"  # a ControlNet's conditioning images (train_target=controlnet)
# the train_targets trained on the diffusion (or flow-matching) objective
DIFFUSION_TARGETS = ("unet", "transformer", "lora", "controlnet")


@dataclass
class TrainingData:
    """What the reading pass gives a training task: the tables' valid rows and, for the diffusion targets, each
    training image's size (``sizes``: its aspect-ratio bucket), the cached VAE latents (``train_latents``; None:
    pixels are read for every step, in ``data_threads`` worker processes) and the validation latents' moments."""

    train: IndexedTable
    val: IndexedTable | None = None
    sizes: list[Size] | None = None
    train_latents: CachedLatents | None = None
    val_moments: torch.Tensor | None = None
    data_threads: int = 0
    texts: dict[str, torch.Tensor] | None = None  # caption → its cached text embedding (caches_text_embeddings)

    @property
    def val_captions(self) -> list[str]:
        return self.val.captions if self.val is not None else []


def read_training_data(model: LatentDiffusion, inputs: InputTables, flags: ParsedFlags, settings: TrainingSettings,
                       policy: BadRowPolicy, resolution: int, text_length: int | None = None) -> TrainingData:
    """``--tables`` read once for ``settings.train_target``: every bad row found (and reported, then a stop unless
    skip_bad_rows), and for the diffusion targets each image's bucket and cached latents."""
    if settings.train_target not in DIFFUSION_TARGETS:
        logger.info("reading %s (train_target=%s)", inputs.tables[0], settings.train_target)
        train = index_table(inputs.tables[0], inputs, policy)
        val = index_table(inputs.tables[1], inputs, policy) if len(inputs.tables) == 2 else None
        check_reading_pass(policy, flags.checkpoint_dir, train, val)
        return TrainingData(train, val)
    use_cache = settings.caches_latents
    if settings.cache_latents and settings.random_pixels:
        logger.warning("cache_latents is off: random_crop/random_flip change the pixels every epoch")
    encode_batch = min(flags.micro_batch_size, MAX_ENCODE_BATCH)  # the memory plan counts this many per VAE call
    tables = inputs.tables
    buckets = Buckets(model, resolution, settings, tables[0])
    logger.info("reading %s%s", tables[0], " and caching VAE latents" if use_cache else "")
    extra = (CONTROL_COLUMN,) if settings.train_target == "controlnet" else ()
    if extra and CONTROL_COLUMN not in inputs.names:
        raise UserError(f"train_target=controlnet needs a conditioning-image column named '{CONTROL_COLUMN}' in "
                        f"--input_schema (base64 images, like {inputs.image_column}), e.g. "
                        f"idx:str:1,text:str:1,{inputs.image_column}:str:1,{CONTROL_COLUMN}:str:1")
    key = {"vae": module_digest(model.vae), "device": model.vae.device.type, "dtype": str(model.vae.dtype),
           "use_amp": flags.use_amp, "encode_batch": encode_batch, "resolution": resolution,
           "skip_first_line": inputs.skip_first_line, "schema": [c.name for c in inputs.schema],
           "columns": [inputs.text_column, inputs.image_column], "skip_bad_rows": policy.skip}
    if use_cache:
        train, cached = read_and_encode(tables[0], "train", inputs, policy, model, flags, encode_batch, {
            **key, "buckets": buckets.sizes, "skip_small_images": buckets.skip_small}, buckets.size_of, buckets.accept,
            extra)
    else:
        train, cached = index_table(tables[0], inputs, policy, accept=buckets.accept, extra_images=extra), None
    val, val_cached = None, None
    if len(tables) == 2:  # validated on square centre crops: its loss compares across runs and bucket settings
        val, val_cached = read_and_encode(tables[1], "val", inputs, policy, model, flags, encode_batch, key,
                                          extra_images=extra)
    check_reading_pass(policy, flags.checkpoint_dir, train, val)
    sizes = [buckets.size_for(*size) for size in train.sizes]
    buckets.report(sizes)
    val_moments = val_cached.batch(list(range(len(val_cached)))) if val is not None else None
    data_threads = flags.data_threads if not use_cache else 0
    if use_cache and "data_threads" in flags.given:
        logger.warning("--data_threads has no effect with cached latents (nothing is decoded during training)")
    texts = None
    if family_of(model).caches_text_embeddings and not settings.train_text_encoder:  # a trained one encodes per step
        texts = cached_text_embeddings(model, ["", *train.captions, *(val.captions if val is not None else [])],
                                       flags.checkpoint_dir, text_length)
    return TrainingData(train, val, sizes, cached, val_moments, min(data_threads, os.cpu_count() or 1), texts)


# ------------------------------------------------------------------------------------------------ pixel batches
class PixelReader:
    """Rows of ``table`` decoded and preprocessed at their ``sizes`` (``column``: another image column than the
    table's, e.g. a ControlNet's conditioning images), with the seeded per-sample random crop and flip of
    ``epoch`` (None: centre crops, no flip, as validation reads them)."""

    def __init__(self, table: IndexedTable, sizes: list[Size], *, seed: int, random_crop: bool = False,
                 random_flip: bool = False, column: str | None = None):
        self.table, self.sizes, self.seed, self.column = table, sizes, seed, column
        self.random_crop, self.random_flip = random_crop, random_flip

    def pixels(self, indices: list[int], epoch: int | None) -> torch.Tensor:
        random = epoch is not None
        return torch.stack([preprocess_image(
            self.table.read_image(i, self.column), self.sizes[i], random_crop=random and self.random_crop,
            random_flip=random and self.random_flip,
            generator=sample_generator(self.seed, epoch, i, PIXEL_STAGE) if random else None) for i in indices])

    def batches(self, order: list[list[int]], epoch: int, workers: int = 0):
        """The pixels of each micro-batch of ``order``; in ``workers`` worker processes when above 0."""
        if workers <= 0:
            for indices in order:
                yield self.pixels(indices, epoch)
            return
        loader = torch.utils.data.DataLoader(_PixelDataset(self, epoch), batch_sampler=order, num_workers=workers)
        yield from loader


class _PixelDataset(torch.utils.data.Dataset):
    def __init__(self, reader: PixelReader, epoch: int):
        self.reader, self.epoch = reader, epoch

    def __len__(self) -> int:
        return len(self.reader.table)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.reader.pixels([index], self.epoch)[0]
