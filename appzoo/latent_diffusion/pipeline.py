"""The Python API of the app, in EasyNLP's shape (``pipeline("latent_diffusion", model, **parameters)``) with
diffusers' manners (PIL images, initial ``latents=``): prompts → one record per image, as predict writes rows.

Image *k* of prompt number *i* (counted from 1, as predict counts input lines) gets predict's seed for line *i*, so
``gen(prompts)`` gives the images ``--mode=predict`` gives for a TSV of the same prompts and ``--random_seed``.
"""

from __future__ import annotations

import base64
from typing import Any

import torch

from appzoo.latent_diffusion.conditioning import ImageInputs, check_masks
from appzoo.latent_diffusion.generation import GenerationSettings, Generator, image_seed
from appzoo.latent_diffusion.loading import load_model
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import encode_image

DEFAULT_RANDOM_SEED = 1234  # --random_seed's default


class LatentDiffusionPipeline:
    def __init__(self, model_path: str | None, params: dict[str, Any], *, random_seed: int = DEFAULT_RANDOM_SEED,
                 batch_size: int = 16, device: str | torch.device | None = None):
        self.params = params
        self.random_seed, self.batch_size = random_seed, batch_size
        self.model = load_model(model_path or "", device=device, optimize=params["optimize"],
                                precision=params["precision"], lora=params["lora"])
        self.generator = Generator(self.model, GenerationSettings.from_params(params))

    @property
    def samples_per_prompt(self) -> int:
        return self.params["n_samples"] * self.params["n_iter"]

    def __call__(self, prompts: str | list[str], latents: torch.Tensor | None = None, *, images=None, masks=None,
                 control_images=None) -> list[dict[str, Any]]:
        """One record per image, in prompt order then sample order: ``idx`` (the prompt's position, from 0, as
        EasyNLP's pipeline numbers its inputs), ``text``, ``sample_id``, ``seed``, ``image`` (PIL) and
        ``image_base64`` (PNG). ``latents``: the initial noise of every image, shape (images, channels, h, w).
        From images (PIL, one per prompt, or one for all): ``images`` (img2img, at the ``strength`` parameter),
        ``masks`` with them (inpainting; white = repaint), ``control_images`` for the ``controlnet`` parameter's
        ControlNet(s) (one image per prompt; with several ControlNets, a list of such per ControlNet)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise UserError("pipeline input must be a string or a list of strings")
        inputs = self._image_inputs(len(prompts), images, masks, control_images)
        jobs = [(i, prompt, sample, image_seed(self.random_seed, i + 1, sample))
                for i, prompt in enumerate(prompts) for sample in range(self.samples_per_prompt)]
        if latents is not None and len(latents) != len(jobs):
            raise UserError(f"latents: {len(latents)} given for {len(jobs)} images ({len(prompts)} prompts × "
                            f"{self.samples_per_prompt} samples)")
        if inputs is not None:
            inputs = inputs.repeat([self.samples_per_prompt] * len(prompts))
        records = []
        with torch.inference_mode():
            for start in range(0, len(jobs), self.batch_size):
                chunk = jobs[start:start + self.batch_size]
                part = None if inputs is None else inputs.slice(start, start + len(chunk))
                images_out = self.generator([prompt for _, prompt, _, _ in chunk], [seed for *_, seed in chunk],
                                            None if latents is None else latents[start:start + len(chunk)],
                                            inputs=part)
                for (i, prompt, sample, seed), image in zip(chunk, images_out):
                    records.append({"idx": i, "text": prompt, "sample_id": sample, "seed": seed, "image": image,
                                    "image_base64": base64.b64encode(encode_image(image, "png")).decode("ascii")})
        return records

    @staticmethod
    def _image_inputs(count: int, images, masks, control_images) -> ImageInputs | None:
        from PIL import Image

        def per_prompt(value, name):
            if value is None:
                return None
            items = [value] * count if isinstance(value, Image.Image) else list(value)
            if len(items) != count or not all(isinstance(item, Image.Image) for item in items):
                raise UserError(f"{name}: give one PIL image, or a list of {count} (one per prompt)")
            return items

        controls = None
        if control_images is not None:
            nested = isinstance(control_images, (list, tuple)) and control_images and \
                isinstance(control_images[0], (list, tuple))
            controls = [per_prompt(c, "control_images") for c in (control_images if nested else [control_images])]
        inputs = ImageInputs(per_prompt(images, "images"), per_prompt(masks, "masks"), controls)
        if inputs.masks:
            if not inputs.images:
                raise UserError("masks: inpainting needs the images they apply to (images=...)")
            check_masks(inputs.images, inputs.masks, lambda i: f"masks[{i}]")
        return inputs if inputs else None
