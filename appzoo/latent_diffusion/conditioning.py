"""Generation from images: what an image-to-image, inpainting or ControlNet request brings beside its prompt, made
ready for diffusers' pipelines (``StableDiffusionImg2ImgPipeline``, ``StableDiffusionInpaintPipeline``,
``StableDiffusionControlNet{,Img2Img,Inpaint}Pipeline``), which ``generation.generate`` runs over our components.

* ``ImageInputs``: per image, an init image (img2img, inpainting), a mask (inpainting; white = repaint) and a
  conditioning image per ControlNet. Init and conditioning images are resized to the generation size (Lanczos, as
  diffusers' image processor does); a mask must have its image's size.
* ``parse_controlnets``: ``controlnet=path[:scale],…`` → (path, scale) pairs; ``load_controlnets`` reads
  diffusers' ControlNet folders of the model family's class (SD-1.x: ``ControlNetModel``, as PAI publishes them;
  Z-Image, Qwen-Image: ``ZImageControlNetModel``, ``QwenImageControlNetModel``) or a ControlNet shipped with the
  package, by name.
* ``preprocess_control``: the built-in preprocessors that need no weights — ``canny`` edges and ``none`` (the
  conditioning image is used as it is).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from easynlp_ldm.errors import UserError

CONTROL_PREPROCESSORS = ("none", "canny")


@dataclass
class ImageInputs:
    """What images a batch brings: ``images`` and ``masks`` one per generated image (or None), ``controls`` one list
    per ControlNet, each one image per generated image."""

    images: list[Image.Image] | None = None
    masks: list[Image.Image] | None = None
    controls: list[list[Image.Image]] | None = None

    def __bool__(self) -> bool:
        return bool(self.images or self.masks or self.controls)

    def slice(self, start: int, stop: int) -> ImageInputs:
        def part(items):
            return None if items is None else items[start:stop]

        return ImageInputs(part(self.images), part(self.masks),
                           None if self.controls is None else [part(c) for c in self.controls])

    def repeat(self, counts: list[int]) -> ImageInputs:
        """Each input repeated for the images generated from it (``counts[i]`` for input i)."""
        def rep(items):
            return None if items is None else [item for item, n in zip(items, counts) for _ in range(n)]

        return ImageInputs(rep(self.images), rep(self.masks),
                           None if self.controls is None else [rep(c) for c in self.controls])


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    image = image.convert("RGB")
    return image if image.size == (width, height) else image.resize((width, height), Image.LANCZOS)


def check_masks(images: list[Image.Image], masks: list[Image.Image], where) -> None:
    """A mask has its image's size (``where(i)`` names input i: a row, a request field)."""
    for i, (image, mask) in enumerate(zip(images, masks)):
        if image.size != mask.size:
            raise UserError(f"{where(i)}: the mask is {mask.width}×{mask.height} but its image is "
                            f"{image.width}×{image.height}; give a mask of the image's size (white = repaint)")


def canny(image: Image.Image, low: int = 100, high: int = 200) -> Image.Image:
    """Canny edges (Gaussian blur, Sobel gradients, non-maximum suppression, hysteresis with thresholds ``low`` and
    ``high`` on the gradient magnitude, as OpenCV's defaults in ControlNet's annotator): white edges on black, RGB."""
    gray = np.asarray(image.convert("L").filter(ImageFilter.GaussianBlur(1.4)), dtype=np.float32)
    padded = np.pad(gray, 1, mode="edge")
    gx = (padded[:-2, 2:] + 2 * padded[1:-1, 2:] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[1:-1, :-2]
                                                                       + padded[2:, :-2])
    gy = (padded[2:, :-2] + 2 * padded[2:, 1:-1] + padded[2:, 2:]) - (padded[:-2, :-2] + 2 * padded[:-2, 1:-1]
                                                                       + padded[:-2, 2:])
    magnitude = np.hypot(gx, gy)
    angle = (np.rad2deg(np.arctan2(gy, gx)) + 180.0) % 180.0
    direction = (np.round(angle / 45.0).astype(int) % 4)  # 0: horizontal gradient, 1: 45°, 2: vertical, 3: 135°
    mag = np.pad(magnitude, 1)
    h, w = magnitude.shape
    offsets = {0: ((0, 1), (0, -1)), 1: ((1, 1), (-1, -1)), 2: ((1, 0), (-1, 0)), 3: ((1, -1), (-1, 1))}
    keep = np.zeros_like(magnitude, dtype=bool)
    for d, ((dy1, dx1), (dy2, dx2)) in offsets.items():
        n1 = mag[1 + dy1:1 + dy1 + h, 1 + dx1:1 + dx1 + w]
        n2 = mag[1 + dy2:1 + dy2 + h, 1 + dx2:1 + dx2 + w]
        keep |= (direction == d) & (magnitude >= n1) & (magnitude >= n2)
    thin = np.where(keep, magnitude, 0.0)
    strong, weak = thin >= high, thin >= low
    edges = strong.copy()
    while True:  # hysteresis: weak pixels joined (8-connected) to strong ones
        grown = np.pad(edges, 1)
        neighbours = np.zeros_like(edges)
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                neighbours |= grown[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        new = weak & neighbours & ~edges
        if not new.any():
            break
        edges |= new
    return Image.fromarray((edges * 255).astype(np.uint8)).convert("RGB")


def preprocess_control(image: Image.Image, preprocessor: str) -> Image.Image:
    if preprocessor == "canny":
        return canny(image)
    if preprocessor in ("", "none"):
        return image.convert("RGB")
    raise UserError(f"control_preprocessor={preprocessor}: use one of {', '.join(CONTROL_PREPROCESSORS)}")


def parse_controlnets(text: str) -> tuple[tuple[str, float], ...]:
    """``path[:scale],path[:scale]`` → ((path, scale), …); scale 1.0 when not given."""
    specs = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        path, scale = part, 1.0
        head, sep, tail = part.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass
        specs.append((path, scale))
    return tuple(specs)


def _check_controlnet_class(path: str, class_name: str) -> None:
    """A ControlNet of another model family (its config.json's ``_class_name``) is refused in one line: diffusers
    would load it with random weights where the configs differ."""
    import json
    import os

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            found = json.load(handle).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return  # from_pretrained reports what is wrong with the file
    if found and found != class_name:
        raise UserError(f"controlnet={path}: a {found} folder, but this model takes a {class_name}")


def load_controlnets(paths: list[str], device, dtype, class_name: str = "ControlNetModel"):
    """diffusers ControlNet folders of the class ``class_name`` (the model family's: ``ControlNetModel`` for
    SD-1.x), read from local disk only."""
    import os

    import diffusers

    from modelzoo.pretrained import embedded_controlnets

    controlnet_class = getattr(diffusers, class_name)
    models = []
    embedded = embedded_controlnets()
    for path in paths:
        if not os.path.isdir(path) and path in embedded:  # a ControlNet shipped with the package, by name
            path = embedded[path]
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise UserError(f"controlnet={path}: not a ControlNet folder (expected diffusers' {class_name} layout: "
                            f"config.json and diffusion_pytorch_model.safetensors or .bin)")
        _check_controlnet_class(path, class_name)
        try:
            models.append(controlnet_class.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
                          .to(device).eval())
        except (OSError, ValueError) as err:
            raise UserError(f"controlnet={path}: cannot read it ({err})") from None
    return models
