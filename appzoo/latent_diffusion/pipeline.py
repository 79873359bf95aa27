"""The Python API of the app, in EasyNLP's shape (``pipeline("latent_diffusion", model, **parameters)``) with
diffusers' manners (PIL images, initial ``latents=``): prompts → one record per image, as predict writes rows.

Image *k* of prompt number *i* (counted from 1, as predict counts input lines) gets predict's seed for line *i*, so
``gen(prompts)`` gives the images ``--mode=predict`` gives for a TSV of the same prompts and ``--random_seed``.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
from typing import Any

import numpy as np
import torch

from appzoo.latent_diffusion.conditioning import ImageInputs, check_masks
from appzoo.latent_diffusion.generation import Generator, image_seed
from appzoo.latent_diffusion.loading import load_model
from appzoo.latent_diffusion.params import PARAMS
from appzoo.latent_diffusion.settings import InferenceSettings, image_input_problem, pipeline_takes_strength
from easynlp_ldm.args import validate_parameters
from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import encode_image

DEFAULT_RANDOM_SEED = 1234  # --random_seed's default
# Settings fixed when the model is loaded: reset() cannot change them (a new pipeline() can).
LOAD_SETTINGS = ("optimize", "precision", "lora")

logger = logging.getLogger("easynlp")


class LatentDiffusionPipeline:
    def __init__(self, model_path: str | None, params: dict[str, Any], *, random_seed: int = DEFAULT_RANDOM_SEED,
                 batch_size: int = 16, device: str | torch.device | None = None):
        self.settings = InferenceSettings.from_params(params)
        self.random_seed, self.batch_size = random_seed, batch_size
        self.model = load_model(model_path or "", device=device, optimize=self.settings.optimize,
                                precision=self.settings.precision, lora=self.settings.lora, what="pipeline() model")
        self.generator = Generator(self.model, self.settings.generation())
        self.labels = self.settings.aigc_labels()
        self.files = None
        self.written = 0  # image folders written (write_image=True), numbered on across calls as EasyNLP's counter

    def reset(self, n_samples: int | None = None, sample_steps: int | None = None, **user_defined_parameters):
        """EasyNLP's ``generator.reset(n_samples, sample_steps)``: new images per prompt and sampling steps for the
        next calls; other generation parameters may be given by name too (checked as pipeline() checks them)."""
        changes = dict(user_defined_parameters)
        if n_samples is not None:
            changes["n_samples"] = n_samples
        if sample_steps is not None:
            changes["ddim_steps"] = sample_steps
        values, notes = validate_parameters(changes.items(), PARAMS, "predict", "latent_diffusion", source="reset()")
        for note in notes:
            logger.warning(note.replace("--mode=predict", "the Python pipeline"))
        names = {param.name for param in PARAMS for key in changes if key in (param.name, *param.aliases)}
        fixed = sorted(names.intersection(LOAD_SETTINGS))
        if fixed:
            raise UserError(f"reset(): {', '.join(fixed)} is decided when the model loads; make a new pipeline() "
                            f"with it instead")
        settings = dataclasses.replace(self.settings, **{name: values[name] for name in names
                                                         if name in InferenceSettings.__dataclass_fields__})
        self.generator = Generator(self.model, settings.generation())
        if any(name.startswith("aigc_") for name in names):
            self.labels = settings.aigc_labels()
        self.settings = settings
        logger.info("pipeline reset: %s", ", ".join(f"{name}={values[name]}" for name in sorted(names)))

    @property
    def samples_per_prompt(self) -> int:
        return self.settings.n_samples * self.settings.n_iter

    def __call__(self, prompts: str | list[str], latents: torch.Tensor | None = None, *, images=None, masks=None,
                 control_images=None) -> list[dict[str, Any]]:
        """One record per image, in prompt order then sample order: ``idx`` (the prompt's position, from 0, as
        EasyNLP's pipeline numbers its inputs), ``text``, ``sample_id``, ``seed``, ``image`` (PIL) and
        ``image_base64`` (PNG), and EasyNLP's keys: ``gen_imgbase64`` (the same base64 as bytes) and
        ``image_tensor`` (float 0-1, images × 3 × H × W: all images of the record's prompt and ``n_iter`` round,
        one tensor shared by their records, as EasyNLP's pipeline gave it), ``aigc_produce_id`` (the ProduceID of
        its AIGC label; empty with aigc_label=False). ``image`` and ``image_tensor`` are the generated pixels; the
        encoded image and the files carry the AIGC labels (the visible one with aigc_visible_label=True).
        ``write_image=True`` also writes
        ``image_prefix/<n>/0000.png …`` with ``prompt.txt``, one folder per prompt and round, numbered on across
        calls as EasyNLP's predictor numbered them.
        ``latents``: the initial noise of every image, shape (images, channels, h, w).
        From images (PIL, one per prompt, or one for all): ``images`` (img2img, at the ``strength`` parameter),
        ``masks`` with them (inpainting; white = repaint), ``control_images`` for the ``controlnet`` parameter's
        ControlNet(s) (one image per prompt; with several ControlNets, a list of such per ControlNet)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise UserError("pipeline input must be a string or a list of strings")
        inputs = self._image_inputs(len(prompts), images, masks, control_images)
        generation = self.generator.settings
        problem = image_input_problem(generation.steps, generation.strength, generation.guidance_rescale,
                                      image=images is not None, mask=masks is not None,
                                      controlnet=bool(generation.controlnets),
                                      takes_strength=pipeline_takes_strength(self.model, mask=masks is not None,
                                                                             controlnet=bool(generation.controlnets)))
        if problem and not problem.error:
            logger.warning("%s (images=)", problem.message)
        elif problem:
            raise UserError(problem.message)
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
                    label = self.labels.label()
                    data = encode_image(image, "png", label=label)
                    encoded = base64.b64encode(data)
                    records.append({"idx": i, "text": prompt, "sample_id": sample, "seed": seed, "image": image,
                                    "image_base64": encoded.decode("ascii"), "gen_imgbase64": encoded,
                                    "aigc_produce_id": label.produce_id if label else ""})
        self._easynlp_views(records)
        return records

    def _easynlp_views(self, records: list[dict[str, Any]]) -> None:
        """EasyNLP's ``image_tensor`` per prompt and round, and its image folders when write_image=True."""
        n_samples = self.settings.n_samples
        for start in range(0, len(records), n_samples):
            group = records[start:start + n_samples]
            tensor = torch.from_numpy(np.stack([np.asarray(r["image"].convert("RGB")) for r in group]))
            tensor = tensor.permute(0, 3, 1, 2).float().div_(255)
            for record in group:
                record["image_tensor"] = tensor
            if self.settings.write_image:
                self._write(group)

    def _write(self, group: list[dict[str, Any]]) -> None:
        from appzoo.latent_diffusion.predict import ImageFiles

        if self.files is None:
            self.files = ImageFiles(self.settings.image_prefix, self.settings.image_format)
        number = self.written
        self.written += 1
        for sample, record in enumerate(group):
            label = self.labels.label(record["aigc_produce_id"]) if record["aigc_produce_id"] else None
            record["path"] = self.files.write(str(number), number + 1, record["text"], sample,
                                              encode_image(record["image"], self.settings.image_format, label=label))

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
