"""The app's settings, typed once: the only module that reads the parsed ``user_defined_parameters``.

* ``TrainingSettings`` (``--mode=train``) and ``InferenceSettings`` (predict, evaluate, serve, export and the Python
  API) are frozen dataclasses whose fields are made from the declarations in params.py, one field per parameter of
  their modes: a new parameter is its ``Param`` there plus where it is used, never a second declaration.
  ``from_params`` is where a parsed dict is read; EasyNLP's training keys whose meaning differs from ours are
  normalised in ``TrainingSettings.from_params``.
* ``GenerationSettings`` is the one vocabulary of sampling settings. It is frozen and hashable: serve batches the
  requests whose settings are equal. Each outside vocabulary is mapped to it in exactly one place —
  ``GenerationSettings.from_params`` for ``--user_defined_parameters`` (EasyNLP's names, ``PARAM_NAMES``) and
  ``serve.REQUEST_FIELDS`` for an HTTP request. Adding a sampling setting is its field here, its pass-through in
  ``generation.generate``, and one entry per vocabulary.
* The checks of generation settings live beside them: the size rules (``size_factor``), DDIM's eta
  (``eta_problem``) and the one check of image inputs (``image_input_problem``) that predict, the Python API, serve
  and generation share.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from appzoo.latent_diffusion.conditioning import parse_controlnets
from appzoo.latent_diffusion.params import PARAMS
from easynlp_ldm.aigc import AigcLabels
from easynlp_ldm.errors import UserError
from modelzoo.families import family_of, registered
from modelzoo.families.base import IMG2IMG, INPAINT
from modelzoo.ldm import LatentDiffusion
from modelzoo.samplers import eta_samplers, sampler_label, scheduler_class_name, step_takes

logger = logging.getLogger("easynlp")

TRAINING_MODES = frozenset({"train"})
INFERENCE_MODES = frozenset({"predict", "evaluate", "serve", "export"})


def _fields(modes: frozenset) -> list[tuple[str, Any, dataclasses.Field]]:
    """One dataclass field per parameter declared for any of ``modes``, at its declared default."""
    return [(param.name, param.type if param.default is not None else param.type | None,
             dataclasses.field(default=param.default)) for param in PARAMS if param.modes & modes]


class _TrainingRules:
    """What ``TrainingSettings`` knows besides its fields: how a parsed dict becomes one, and what follows from
    several settings at once."""

    @classmethod
    def from_params(cls, params: dict[str, Any], tables: list[str] | tuple[str, ...] = ()) -> TrainingSettings:
        """``--user_defined_parameters`` of ``--mode=train`` → settings, with EasyNLP's training keys whose meaning
        differs from ours mapped explicitly (``size`` is an alias of ``resolution``; ``text_len`` is applied where the
        text length is chosen): ``do_eval=False`` drops the validation table of ``tables``;
        ``not_use_gradient_checkpoint`` is the inverse of ``gradient_checkpointing``; ``center_crop=False`` means a
        random crop, as in diffusers' scripts. What the mapping has to say is kept in ``notes`` (logged by
        ``log_notes`` once the run is known to go ahead)."""
        values = {name: params[name] for name in cls.__dataclass_fields__ if name != "notes"}
        notes = []
        if not values["do_eval"] and len(tables) == 2:
            notes.append((logging.WARNING, f"do_eval=False: no validation; {tables[1]} is not read, and the top-level "
                                           f"checkpoint is the last one"))
        not_use = values["not_use_gradient_checkpoint"]
        if not_use is not None:
            if not_use and values["gradient_checkpointing"]:
                raise UserError("not_use_gradient_checkpoint=True contradicts gradient_checkpointing=True; give one")
            if not_use:
                notes.append((logging.INFO, "not_use_gradient_checkpoint=True: gradient checkpointing stays off (the "
                                            "default here)"))
            values["gradient_checkpointing"] = not not_use
        if values["base_precision"] != "fp32" and values["train_target"] not in ("lora", "controlnet"):
            raise UserError(f"base_precision={values['base_precision']} applies to train_target=lora or controlnet")
        if not (values["center_crop"] or values["random_crop"]):
            notes.append((logging.INFO, "center_crop=False: images are cropped at a seeded random position "
                                        "(random_crop=True)"))
            values["random_crop"] = True
        return cls(**values, notes=tuple(notes))

    def log_notes(self, log: logging.Logger) -> None:
        for level, note in self.notes:
            log.log(level, note)

    def tables_read(self, tables: list[str]) -> list[str]:
        """The tables of ``--tables`` the run reads: the validation table only with do_eval."""
        return list(tables) if self.do_eval else list(tables[:1])

    @property
    def random_pixels(self) -> bool:
        """Whether an image's pixels change every epoch (random crops or flips)."""
        return self.random_crop or self.random_flip

    @property
    def base_dtype(self):
        """The dtype the model's weights are loaded in (base_precision): bf16 (int8, fp8 and nf4 load in bf16, their
        compute dtype, before the denoiser's linear weights are quantised), or None (fp32, as read)."""
        import torch

        return torch.bfloat16 if self.base_precision != "fp32" else None

    @property
    def caches_latents(self) -> bool:
        """cache_latents, unless random crops or flips change the pixels every epoch."""
        return self.cache_latents and not self.random_pixels


TrainingSettings = dataclasses.make_dataclass(
    "TrainingSettings", [*_fields(TRAINING_MODES), ("notes", tuple, dataclasses.field(
        default=(), compare=False, repr=False))], bases=(_TrainingRules,), frozen=True,
    namespace={"__module__": __name__, "__doc__": "The settings of --mode=train: one field per training parameter of "
                                                  "params.py, EasyNLP's keys normalised (``from_params``)."})


class _InferenceRules:
    @classmethod
    def from_params(cls, params: dict[str, Any]) -> InferenceSettings:
        """The parsed ``--user_defined_parameters`` (or ``pipeline()``'s parameters) → settings."""
        return cls(**{name: params[name] for name in cls.__dataclass_fields__})

    def generation(self) -> GenerationSettings:
        """The sampling settings (notes on settings left without effect are logged now, where a mode builds them)."""
        return GenerationSettings.from_params(dataclasses.asdict(self))

    def aigc_labels(self) -> AigcLabels:
        """The AIGC labels the generated images carry (aigc_label=False: none, with a warning)."""
        return AigcLabels.configured(self.aigc_label, self.aigc_visible_label, self.aigc_producer,
                                     self.aigc_propagator)


InferenceSettings = dataclasses.make_dataclass(
    "InferenceSettings", _fields(INFERENCE_MODES), bases=(_InferenceRules,), frozen=True,
    namespace={"__module__": __name__, "__doc__": "The settings of predict, evaluate, serve, export and the Python "
                                                  "API: one field per parameter of params.py for those modes."})


@dataclass(frozen=True)
class GenerationSettings:
    steps: int = 20
    guidance_scale: float = 5.0
    height: int = 0  # pixels; 0: the model's native size (``for_model`` fills it in)
    width: int = 0
    sampler: str = ""  # a sampler's short name; "": the model's own scheduler
    negative_prompt: str = ""
    eta: float = 0.0  # DDIM's stochasticity
    guidance_cutoff: float = 1.0  # fraction of the steps (the first ones) run with classifier-free guidance
    guidance_rescale: float = 0.0  # rescales the guided prediction's std to the text one's (Lin et al. 2023, §3.4)
    do_sr: bool = False  # ESRGAN ×4 after decoding
    sr_tile: int = 256  # super-resolution tile, input pixels (0: whole image)
    sr_channel_order: str = ""  # rgb or bgr; "": the model's config, else rgb
    adapters: tuple[tuple[str, float], ...] = ()  # switchable LoRA adapters (serve's lora_library) and their scales
    strength: float = 0.0  # img2img / inpainting: how much of the init image is noised away (0: 0.8, 1.0 inpainting)
    controlnets: tuple[tuple[str, float], ...] = ()  # ControlNet folders and their conditioning scales
    control_preprocessor: str = "none"  # what turns a conditioning image into the ControlNet's input (none, canny)
    cfg_normalization: float = 0.0  # Z-Image: the guided prediction's norm capped at this × the prompt's (0: off)
    cfg_truncation: float = 1.0  # Z-Image: guidance stops once the step's t/1000 passes it (1: every step)
    true_cfg_scale: float = 4.0  # Qwen-Image: classifier-free guidance scale (> 1: with the negative prompt)
    # Fields the user did not give (their parameter None): at the defaults above until ``for_model`` puts the model
    # folder's own defaults (its family's ``generation_defaults``) there; empty once made for a model. Not part of
    # equality: settings that sample alike are equal whether a value was given or defaulted.
    unset: frozenset[str] = dataclasses.field(default=frozenset(), compare=False)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> GenerationSettings:
        """``--user_defined_parameters`` (EasyNLP's names) → settings."""
        values = {field: params[name] for field, name in PARAM_NAMES.items()}
        unset = frozenset(field for field, value in values.items() if value is None)
        settings = cls(**{field: value for field, value in values.items() if field not in unset}, unset=unset,
                       controlnets=parse_controlnets(params.get("controlnet", "")))
        for note in settings.unused_settings():
            logger.warning(note)
        return settings

    def for_model(self, model: LatentDiffusion) -> GenerationSettings:
        """The concrete settings for ``model``: the folder's own defaults where the user gave none, native size and
        ESRGAN channel order filled in, size checked."""
        defaults, source = family_of(model).generation_defaults(model)
        applied = {field: value for field, value in defaults.items() if field in self.unset}
        if applied:
            logger.info("the model's sampling defaults where user_defined_parameters give none: %s (from %s)",
                        ", ".join(f"{PARAM_NAMES[field]}={value:g}" for field, value in applied.items()), source)
            for note in dataclasses.replace(self, **applied).unused_settings():
                if note not in self.unused_settings():
                    logger.warning(note)
        settings = dataclasses.replace(self, **applied, unset=frozenset(), height=self.height or model.image_size,
                                       width=self.width or model.image_size, sr_channel_order=self.sr_channel_order or
                                       model.extra.get("esrgan_channel_order", "rgb"))
        check_size(model, settings.height, settings.width)
        problem = eta_problem(settings.eta, settings.sampler, model.scheduler_class) or \
            family_of(model).sampling_problem(settings, model)
        if problem:
            raise UserError(problem)
        for note in settings.other_families_settings(model):
            logger.warning(note)
        return settings

    def other_families_settings(self, model: LatentDiffusion) -> list[str]:
        """Notes on the settings given (not at their defaults) that only another model family's pipelines take."""
        own = family_of(model)
        notes = []
        for family in registered():
            given = [f"{PARAM_NAMES[name]}={getattr(self, name)!r}" for name in family.own_settings
                     if name not in own.own_settings and getattr(self, name) != GENERATION_DEFAULTS[name]]
            if given:
                notes.append(f"{', '.join(given)} has no effect on {own.name} models (a setting of {family.name} "
                             f"models)")
        return notes

    def unused_settings(self) -> list[str]:
        """Notes on the user's settings that the others leave without effect (each would otherwise be silently
        ignored): guidance's companions without guidance, ESRGAN's without do_sr, a preprocessor without a
        ControlNet."""
        notes = []
        if self.guidance_scale <= 1:  # diffusers runs classifier-free guidance only above 1
            given = [f"{PARAM_NAMES[name]}={value!r}" for name, value, default in (
                ("negative_prompt", self.negative_prompt, ""), ("guidance_cutoff", self.guidance_cutoff, 1.0),
                ("guidance_rescale", self.guidance_rescale, 0.0)) if value != default]
            if given:
                notes.append(f"{', '.join(given)} has no effect with scale={self.guidance_scale:g}: classifier-free "
                             f"guidance runs only with scale > 1")
        if not self.do_sr:
            given = [f"{PARAM_NAMES[name]}={value!r}" for name, value, default in (
                ("sr_tile", self.sr_tile, 256), ("sr_channel_order", self.sr_channel_order, "")) if value != default]
            if given:
                notes.append(f"{', '.join(given)} has no effect without do_sr=True")
        if self.control_preprocessor != "none" and not self.controlnets:
            notes.append(f"control_preprocessor={self.control_preprocessor} has no effect without controlnet=")
        return notes


# GenerationSettings field → its user_defined_parameter (declared in params.py).
PARAM_NAMES = {"steps": "ddim_steps", "guidance_scale": "scale", "height": "H", "width": "W", "sampler": "sampler",
               "negative_prompt": "negative_prompt", "eta": "ddim_eta", "guidance_cutoff": "guidance_cutoff",
               "guidance_rescale": "guidance_rescale", "strength": "strength",
               "control_preprocessor": "control_preprocessor",
               "do_sr": "do_sr", "sr_tile": "sr_tile", "sr_channel_order": "sr_channel_order",
               "cfg_normalization": "cfg_normalization", "cfg_truncation": "cfg_truncation",
               "true_cfg_scale": "true_cfg_scale"}
GENERATION_DEFAULTS = {field.name: field.default for field in dataclasses.fields(GenerationSettings)}


def eta_problem(eta: float, sampler: str, model_scheduler_class: str) -> str | None:
    """Why ``ddim_eta`` cannot apply with ``sampler`` (diffusers passes eta only to a scheduler whose step takes it, and
    would silently ignore it otherwise; EasyNLP's PLMS sampler refused it), or None. An unknown sampler name is left
    to ``make_scheduler`` to report."""
    class_name = scheduler_class_name(sampler, model_scheduler_class)
    if not eta or class_name is None or step_takes(class_name, "eta"):
        return None
    choices = "|".join(eta_samplers())
    return (f"ddim_eta={eta:g} cannot apply to {sampler_label(sampler, model_scheduler_class)}: DDIM's eta "
            f"applies only to sampler={choices}; set sampler={choices} or leave ddim_eta at 0")


def image_strength(strength: float, inpainting: bool) -> float:
    """The strength an img2img (0.8) or inpainting (1.0) run uses when ``strength`` is 0 (not given)."""
    return strength or (1.0 if inpainting else 0.8)


def redraw_problem(steps: int, strength: float, inpainting: bool) -> str | None:
    """Why generation from an image at ``strength`` would redraw no step (diffusers then fails), or None."""
    strength = image_strength(strength, inpainting)
    if int(steps * strength) >= 1:
        return None
    return (f"num_inference_steps × strength is {steps} × {strength:g}: less than one step of the image would be "
            f"redrawn; raise strength or num_inference_steps")


@dataclass(frozen=True)
class ImageInputProblem:
    """Why a generation's image inputs cannot run with its settings (``error``), or a setting they leave without
    effect (a note): ``setting`` is what to change (``mask``, ``guidance_rescale`` or ``strength``), ``message`` the
    reason in generation's words. An entry point with its own vocabulary (serve's request fields, predict's columns)
    words it its own way from ``setting``."""

    setting: str
    message: str
    error: bool = True


def pipeline_takes_strength(model: LatentDiffusion, *, mask: bool, controlnet: bool) -> bool:
    """Whether the model's pipeline from an image (inpainting with ``mask``; with a ControlNet or not) takes
    ``strength`` (its family says: the edit pipelines and ControlNet inpainting start from noise and take none)."""
    return family_of(model).takes_strength(INPAINT if mask else IMG2IMG, controlnet)


def image_input_problem(steps: int, strength: float, guidance_rescale: float, *, image: bool, mask: bool,
                        controlnet: bool, takes_strength: bool = True) -> ImageInputProblem | None:
    """The one check of generation from images, shared by predict, the Python API, serve and generation: a mask
    without its image, guidance_rescale with an image or a ControlNet (diffusers' pipelines for them do not take
    it), an image whose ``strength`` × ``steps`` would redraw no step (diffusers then fails; only where the pipeline
    ``takes_strength``, ``pipeline_takes_strength``) — errors, the first found — else a ``strength`` without an
    image (a note), else None."""
    if guidance_rescale and (image or mask or controlnet):
        return ImageInputProblem("guidance_rescale", "guidance_rescale is not available with an input image, a mask "
                                 "or a ControlNet (diffusers' pipelines for them do not take it); leave it at 0")
    if mask and not image:
        return ImageInputProblem("mask", "a mask needs the image it applies to (inpainting repaints the mask's white "
                                 "part of it)")
    problem = image and takes_strength and redraw_problem(steps, strength, mask)
    if problem:
        return ImageInputProblem("strength", problem)
    if strength and not image:
        return ImageInputProblem("strength", f"strength={strength:g} has no effect without input images", error=False)
    return None


def size_factor(model: LatentDiffusion) -> int:
    """Image sizes must be multiples of this (the model's family says: SD-1.x's is the VAE factor × the UNet's
    downsampling, and 8)."""
    return family_of(model).size_factor(model)


def check_size(model: LatentDiffusion, height: int, width: int) -> None:
    factor = size_factor(model)
    for name, value in (("H", height), ("W", width)):
        if value % factor:
            raise UserError(f"{name}={value} must be a multiple of {factor} for this model (VAE factor "
                            f"{model.vae_scale_factor} × UNet downsampling, and 8)")
