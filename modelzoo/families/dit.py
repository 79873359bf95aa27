"""The flow-matching DiT families: Z-Image (a single-stream DiT, Qwen3 text encoder) and Qwen-Image (an MMDiT,
Qwen2.5-VL text encoder), sampled by their own diffusers pipelines (``ZImagePipeline``, ``QwenImagePipeline`` and
their img2img, inpainting and ControlNet variants; a ControlNet folder is the family's ``controlnet_class``).

Folders they read: diffusers folders whose ``model_index.json`` names the family's pipeline class, loaded with
diffusers' and transformers' own ``from_pretrained`` (offline, no remote code). The model (``DiTModel``) holds the
components and what the app asks of a model: device, dtype, native image size, VAE factor, scheduler config, text
length, tokenizer. Training (``train_target=transformer`` or ``lora``) is diffusers' DreamBooth-LoRA scripts' flow
matching (``objective``, ``encode_texts`` for the text-embedding cache, ``training_latents``, ``predict_flow``); a
fine-tuned model is saved as a diffusers folder (``save``). What the families cannot do yet is refused with one
line where a mode asks for it (the family's ``pipelines``, ``train_targets``, ``export_formats``).
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import json
import math
import os
import shutil
from typing import Any

import torch

from modelzoo.families.base import IMG2IMG, INPAINT, TXT2IMG, ModelFamily, ModelFormatError
from modelzoo.families.dit_defaults import INDEX_KEY as DEFAULTS_KEY
from modelzoo.families.dit_defaults import BadDefaults, folder_defaults, settings_fields

# Where a folder says nothing of its native size (model_index.json's ``_image_size``, or the VAE's sample_size):
# what both pipelines generate by default.
DEFAULT_IMAGE_SIZE = 1024
# max_sequence_length both pipelines tokenise prompts to by default; Qwen-Image's pipeline refuses more than 1024.
DEFAULT_TEXT_LENGTH = 512
# The transformer's attention projections: the LoRA targets of diffusers' DreamBooth-LoRA scripts for both models.
ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The parts of a folder its save writes, each its own subfolder (model_index.json names them).
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


class DiTModel(torch.nn.Module):
    """A flow-matching DiT's components as plain attributes (``transformer``, ``vae``, ``text_encoder``,
    ``tokenizer``), with the geometry its family read from the folder. ``family`` names its family."""

    esrgan_path = None  # no ×4 super-resolution net beside these models

    def __init__(self, family: str, *, transformer, vae, text_encoder, tokenizer, scheduler_config: dict,
                 image_size: int, vae_scale_factor: int, latent_channels: int, text_length_limit: int):
        super().__init__()
        self.family = family
        self.transformer, self.vae, self.text_encoder, self.tokenizer = transformer, vae, text_encoder, tokenizer
        self.scheduler_config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
        self.scheduler_class = scheduler_config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
        self.image_size = int(image_size)
        self.vae_scale_factor = int(vae_scale_factor)
        self.latent_channels = int(latent_channels)
        self.text_length_limit = int(text_length_limit)
        self.text_max_length = min(DEFAULT_TEXT_LENGTH, self.text_length_limit)
        self.extra: dict[str, Any] = {}

    def clamp_text_length(self, requested: int | None) -> int:
        """Tokens per prompt: ``requested`` (``--sequence_length``) or the pipeline's default, never past what the
        text encoder (or the pipeline) takes."""
        return self.text_max_length if requested is None else min(int(requested), self.text_length_limit)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype


def _read_index(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as handle:
            index = json.load(handle)
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


@contextlib.contextmanager
def _quiet_loading():
    """diffusers' and transformers' progress bars off while a model loads or is saved (the app logs what it does)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    enabled = [(module, module.is_progress_bar_enabled()) for module in (diffusers_logging, transformers_logging)]
    for module, _ in enabled:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, was in enabled:
            if was:
                module.enable_progress_bar()


def _link_or_copy_files(source: str, staging: str) -> None:
    """The files under ``source`` into ``staging`` (its subfolders kept): hard links where the file system has them,
    copies otherwise."""
    for base, _folders, files in os.walk(source):
        target = os.path.join(staging, os.path.relpath(base, source))
        os.makedirs(target, exist_ok=True)
        for name in files:
            try:
                os.link(os.path.join(base, name), os.path.join(target, name))
            except OSError:
                shutil.copy2(os.path.join(base, name), os.path.join(target, name))


def _overridden_state(module: torch.nn.Module, prefix: str, overrides: dict[str, torch.Tensor]):
    """``module``'s state dict with the ``overrides`` named ``prefix`` + a key in their place (in its dtype, on the
    CPU)."""
    state = module.state_dict()
    return {key: overrides.get(prefix + key, tensor).detach().to("cpu", tensor.dtype).contiguous()
            for key, tensor in state.items()}


class DiTFamily(ModelFamily):
    """What Z-Image and Qwen-Image share: loading through their diffusers pipeline class, the flow-matching scheduler
    of the folder, prompt strings handed to the pipeline (which templates and encodes them itself), and the
    settings that belong to SD-1.x's samplers refused."""

    denoiser = "transformer"
    folder_classes: tuple[str, ...] = ()  # model_index.json ``_class_name``s of this family's folders
    own_guidance = ""  # the family's own guidance settings, named where SD-1.x's are refused
    # Qwen-Image's ControlNet pipeline samples the conditioning image's latents from the seed's generator before the
    # noise: the pipelines draw the noise themselves, so a seed gives diffusers' image.
    controlnet_takes_latents = False
    openvino_parts = ()
    train_targets = ("transformer", "lora")
    # The folder ``save`` writes (the family's own format), as it is or packed in a .tar.gz (--mode=export's default)
    export_formats = ("tar", "diffusers")
    lora_export_formats = ("comfyui",)  # key layouts --mode=export lora_format= converts a LoRA to
    lora_targets = {"attention": ATTENTION_TARGETS}
    caches_text_embeddings = True
    samplers: tuple[str, ...] = ("euler",)  # sampler= names its pipelines run (dit_samplers.py)

    # ------------------------------------------------------------------------------------------- loading
    def recognises(self, folder: str) -> bool:
        return _read_index(folder).get("_class_name") in self.folder_classes

    def load(self, folder: str, dtype=None) -> DiTModel:
        index = _read_index(folder)
        if index.get("_class_name") not in self.folder_classes:
            raise ModelFormatError(f"{folder}: not a {self.name} model (model_index.json names none of "
                                   f"{', '.join(self.folder_classes)})")
        # ``dtype``: the name diffusers' pipelines take (0.42; they hand it to every component, transformers' too);
        # their ``torch_dtype`` is deprecated and warns (FutureWarning).
        options = {"dtype": dtype} if dtype is not None else {}
        try:
            with _quiet_loading():
                own = self.own_components(folder)
                pipe = self.pipeline_class(index["_class_name"]).from_pretrained(folder, local_files_only=True,
                                                                                 **options, **own)
        except (OSError, ValueError, KeyError, TypeError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ModelFormatError(f"{folder}: cannot load this {self.name} model ({reason})") from None
        model = DiTModel(self.name, transformer=pipe.transformer, vae=pipe.vae, text_encoder=pipe.text_encoder,
                         tokenizer=pipe.tokenizer, scheduler_config=dict(pipe.scheduler.config),
                         image_size=index.get("_image_size") or self.native_size(pipe),
                         vae_scale_factor=pipe.vae_scale_factor, latent_channels=self.latent_channels(pipe),
                         text_length_limit=self.text_length_limit(pipe))
        model.source_path = os.path.abspath(folder)
        for name, part in own.items():
            setattr(model, name, part)
        try:
            model.generation_defaults, model.generation_defaults_source = folder_defaults(folder, index)
        except BadDefaults as err:
            raise ModelFormatError(f"{folder}: model_index.json: {err}") from None
        return model.eval()

    def own_components(self, folder: str) -> dict[str, Any]:
        """Components of the folder read here rather than by diffusers (handed to its ``from_pretrained``, kept as
        the model's attributes of those names); none by default."""
        return {}

    def native_size(self, pipe) -> int:
        return DEFAULT_IMAGE_SIZE

    def latent_channels(self, pipe) -> int:
        raise NotImplementedError

    def text_length_limit(self, pipe) -> int:
        raise NotImplementedError

    def save(self, model: DiTModel, folder: str, *, overrides=None, dtype=None, format=None) -> list[str]:
        """A diffusers folder the family loads again (``model_index.json`` of the folder the model was read from):
        each component's subfolder replaced atomically (``atomic_replace_folder``), ``model_index.json`` last; the
        transformer's weights are ``overrides`` (the trainer's ``transformer.*``, EMA applied) over its own."""
        from safetensors.torch import save_file

        from easynlp_ldm.files import atomic_replace_folder, atomic_write_text

        if format not in (None, "diffusers"):
            raise ValueError(f"{self.name} models are saved as diffusers folders only, not {format!r}")
        os.makedirs(folder, exist_ok=True)
        prefix = f"{self.denoiser}."
        state = {name: tensor for name, tensor in model.transformer.state_dict().items()}
        state.update({name[len(prefix):]: tensor for name, tensor in (overrides or {}).items()
                      if name.startswith(prefix)})
        state = {name: tensor.detach().to("cpu", dtype or tensor.dtype).contiguous() for name, tensor in state.items()}
        written = []
        for name in COMPONENTS:
            with atomic_replace_folder(os.path.join(folder, name)) as staging, _quiet_loading():
                if name == "transformer":
                    model.transformer.save_config(staging)
                    save_file(state, os.path.join(staging, "diffusion_pytorch_model.safetensors"),
                              metadata={"format": "pt"})
                elif name == "scheduler":
                    self.scheduler(model).save_pretrained(staging)
                elif name == "text_encoder" and model.text_encoder is None:  # released: its files as they were read
                    _link_or_copy_files(self.text_encoder_folder(model), staging)
                elif name == "text_encoder" and any(key.startswith("text_encoder.") for key in overrides or {}):
                    # trained (train_text_encoder): from memory, the trainer's weights (EMA applied) over its own
                    model.text_encoder.save_pretrained(staging, state_dict=_overridden_state(
                        model.text_encoder, "text_encoder.", overrides))
                else:
                    getattr(model, name).save_pretrained(staging)
            written += [os.path.join(folder, name, file) for file in sorted(os.listdir(os.path.join(folder, name)))]
        index = _read_index(model.source_path) if getattr(model, "source_path", None) else {}
        index = index or self.folder_index(model)
        index["_image_size"] = model.image_size
        if getattr(model, "generation_defaults", None):  # kept for the folder's users (dit_defaults.py)
            index[DEFAULTS_KEY] = model.generation_defaults
        index_path = os.path.join(folder, "model_index.json")
        atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
        return written + [index_path]

    def text_encoder_folder(self, model: DiTModel) -> str | None:
        """The ``text_encoder/`` subfolder of the folder ``model`` was read from (None: a model read from no folder):
        what ``save`` writes once the text encoder has left memory."""
        source = getattr(model, "source_path", None)
        folder = os.path.join(source, "text_encoder") if source else ""
        return folder if folder and os.path.isdir(folder) else None

    def release_text_encoder(self, model: DiTModel) -> int:
        """The text encoder's weights out of memory (RAM and GPU) for the rest of a training run whose captions are
        all in the text-embedding cache: its parameters moved to the meta device, ``model.text_encoder`` None
        (pipelines then take ``prompt_embeds``), ``save`` writing its files from ``text_encoder_folder``. Returns the
        bytes freed; 0 where the model was read from no folder (it is kept then: nothing else could save it)."""
        encoder = model.text_encoder
        if encoder is None or self.text_encoder_folder(model) is None:
            return 0
        freed = sum(p.numel() * p.element_size() for p in encoder.parameters() if not p.is_meta)
        freed += sum(b.numel() * b.element_size() for b in encoder.buffers() if not b.is_meta)
        on_cuda = any(p.is_cuda for p in encoder.parameters())
        encoder.to("meta")  # frees the storage even where another reference to the module remains
        model.text_encoder = None
        del encoder
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        return freed

    def folder_index(self, model: DiTModel) -> dict:
        """``model_index.json`` for a model read from no folder: the pipeline class and each component's class."""
        index = {"_class_name": self.folder_classes[0]}
        for name in COMPONENTS:
            part = self.scheduler(model) if name == "scheduler" else getattr(model, name)
            library = "diffusers" if type(part).__module__.startswith("diffusers") else "transformers"
            index[name] = [library, type(part).__name__]
        return index

    # ---------------------------------------------------------------------------------------- generation
    def scheduler(self, model: DiTModel, sampler: str = ""):
        """``sampler``: one of the family's ``samplers`` (modelzoo/families/dit_samplers.py says which run and why
        the others do not); empty: euler, the folder's own flow-matching scheduler."""
        from modelzoo.families.dit_samplers import flow_scheduler

        return flow_scheduler(sampler, self.samplers, self.name, model.scheduler_config)

    def sampler_names(self) -> list[str]:
        return list(self.samplers)

    def pipeline(self, model, kind: str = TXT2IMG, controlnet=None, scheduler=None, base=None):
        """The family's pipeline for ``kind``; a sampler that pipeline cannot run (``runs_scheduler``) refused."""
        from modelzoo.families.dit_samplers import runs_scheduler

        pipe = super().pipeline(model, kind, controlnet, scheduler, base)
        if not runs_scheduler(type(pipe), pipe.scheduler):
            raise ValueError(f"{self.name} models cannot run {kind} with {type(pipe.scheduler).__name__} (their "
                             f"{kind} pipeline, {type(pipe).__name__}, noises the image with scale_noise, which it "
                             f"lacks); use sampler=euler")
        return pipe

    def takes_strength(self, kind: str, controlnet: bool) -> bool:
        """What the pipeline's ``__call__`` takes (the edit pipelines and ControlNet inpainting take no strength);
        a kind the family has no pipeline for is refused by name elsewhere."""
        name = self.pipelines.get((kind, controlnet))
        return name is None or "strength" in inspect.signature(self.pipeline_class(name).__call__).parameters

    def generation_defaults(self, model: DiTModel) -> tuple[dict[str, Any], str]:
        """What the folder asks for where the user gives no steps / guidance (read at load: dit_defaults.py)."""
        return settings_fields(getattr(model, "generation_defaults", {})), \
            getattr(model, "generation_defaults_source", "")

    def pipeline_components(self, model: DiTModel, scheduler) -> dict[str, Any]:
        return dict(transformer=model.transformer, vae=model.vae, text_encoder=model.text_encoder,
                    tokenizer=model.tokenizer, scheduler=scheduler if scheduler is not None else self.scheduler(model))

    def encode_prompts(self, model, prompts: list[str], max_length: int | None = None):
        raise NotImplementedError(f"{self.name} pipelines encode their prompts themselves")

    def size_factor(self, model: DiTModel) -> int:
        """The VAE factor × the transformer's 2×2 patches (both pipelines' rule), and 8."""
        return math.lcm(8, model.vae_scale_factor * 2)

    def sampling_problem(self, settings, model) -> str | None:
        given = [f"{name}={value:g}" for name, value, off in (
            ("guidance_rescale", settings.guidance_rescale, 0.0), ("guidance_cutoff", settings.guidance_cutoff, 1.0))
            if value != off]
        if given:
            return (f"{', '.join(given)}: SD-1.x's guidance settings do not apply to {self.name} models; "
                    f"{self.own_guidance}")
        terminal = model.scheduler_config.get("shift_terminal")
        if settings.steps == 1 and terminal and settings.sampler in ("", "euler"):
            # diffusers' FlowMatchEulerDiscreteScheduler stretches one sigma to the terminal by 0 / 0 (a NaN image)
            return (f"ddim_steps=1: this folder's scheduler (shift_terminal={terminal:g}) gives a NaN image at one "
                    f"step in diffusers; use ddim_steps=2 or more")
        return None

    def pipeline_arguments(self, model: DiTModel, prompts: list[str], generators, settings,
                           max_length: int | None = None) -> dict[str, Any]:
        return dict(prompt=list(prompts), num_inference_steps=settings.steps, generator=generators,
                    output_type="np", max_sequence_length=max_length or model.text_max_length)

    def txt2img_arguments(self, model: DiTModel, settings, height: int, width: int, latents) -> dict[str, Any]:
        return dict(height=height, width=width, latents=self.initial_latents(latents))

    def initial_latents(self, latents):
        """The seeds' noise (N, C, h, w) as the family's pipelines take ``latents``."""
        return latents

    def image_arguments(self, model, kind, *, images, masks, controls, control_scales, strength, height, width,
                        latents):
        """The size always (img2img too: these pipelines otherwise generate their default size, not the image's),
        the conditioning images as ``control_image`` (these ControlNet pipelines' name), no ``latents``
        (``controlnet_takes_latents``). Inpainting with a ControlNet repaints the mask from noise and takes no
        ``strength``: one other than 1 is refused rather than ignored."""
        arguments = dict(height=height, width=width)
        if images:
            arguments["image"] = images
            if controls is None:
                arguments["strength"] = strength
            elif strength != 1:
                from easynlp_ldm.errors import UserError

                raise UserError(f"strength={strength:g}: {self.name} models inpaint with a ControlNet from noise (its "
                                f"pipeline, {self.pipelines[kind, True]}, takes no strength); leave strength at 1")
        if masks:
            arguments["mask_image"] = masks
        if controls is not None:
            arguments.update(control_image=controls, controlnet_conditioning_scale=control_scales)
        return arguments

    # ------------------------------------------------------------------------------------------ training
    def objective(self, model: DiTModel, **options):
        """diffusers' flow matching (``modelzoo.objectives.FlowMatchingObjective``); ``options``: its
        ``weighting_scheme``, ``logit_mean``, ``logit_std``, ``mode_scale``."""
        from modelzoo.objectives import FlowMatchingObjective

        return FlowMatchingObjective(model, **options)

    def text_embeddings(self, model: DiTModel, captions: list[str], max_length: int) -> list[torch.Tensor]:
        """Each caption's text embedding as the pipeline computes it for generation (its template, its hidden
        layer, padding dropped): one (tokens, width) tensor per caption, on the model's device. Differentiable:
        a text encoder that trains (``train_text_encoder``) runs it in every step; the cache calls it under no_grad
        (``encode_texts``)."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_texts(self, model: DiTModel, captions: list[str], max_length: int) -> list[torch.Tensor]:
        """``text_embeddings`` without gradients, on the CPU: the text-embedding cache's entries."""
        return [embed.cpu() for embed in self.text_embeddings(model, captions, max_length)]

    def text_encoder_unreached(self, model: DiTModel) -> tuple[str, ...]:
        """Name prefixes of the text encoder's parameters that ``text_embeddings`` never reaches (layers past the
        hidden layer the pipeline reads, a vision tower, a language-model head): they get no gradients, so a text
        encoder that trains keeps them frozen, and the memory plan counts them so."""
        raise NotImplementedError

    def embedded_prompt_arguments(self, model: DiTModel, arguments: dict[str, Any],
                                  texts: dict[str, torch.Tensor]) -> dict[str, Any]:
        """``arguments`` of a pipeline call (``pipeline_arguments``) with the prompts and negative prompts replaced
        by their embeddings from ``texts`` (caption → ``encode_texts``' tensor), as the pipeline takes precomputed
        ones: what it runs without a text encoder."""
        raise NotImplementedError

    def training_latents(self, model: DiTModel, mean: torch.Tensor, logvar: torch.Tensor, eps) -> torch.Tensor:
        """The transformer's latents from the posterior's moments (``eps``: the seeded draw where the family's
        script samples the posterior; None: its mean)."""
        raise NotImplementedError

    def predict_flow(self, model: DiTModel, noisy: torch.Tensor, timesteps: torch.Tensor,
                     texts: list[torch.Tensor]) -> torch.Tensor:
        """The transformer's prediction of noise - latents for ``noisy`` (N, C, h, w) at the schedule's
        ``timesteps``, called as the family's training script calls it."""
        raise NotImplementedError

    def memory_footprint(self, model: DiTModel, *, train_target: str = "transformer", text_length: int | None = None,
                         lora_rank: int = 4, text_encoder_leaves: bool | None = None, train_text_encoder: bool = False,
                         **unused):
        """The transformer's parameters (or a rank-``lora_rank`` LoRA of its attention), the resident VAE, the text
        encoder (only while it fills the text-embedding cache where it leaves memory then: ``release_text_encoder``,
        for a model read from a folder; ``text_encoder_leaves`` decides for a plan of a config; trained beside the
        transformer with ``train_text_encoder``, the parts ``text_embeddings`` reaches), and the activations at
        ``text_length`` tokens (modelzoo/families/dit_memory.py)."""
        from modelzoo.families.dit_memory import dit_footprint

        if train_text_encoder:  # no cache: the encoder runs in every step
            text_encoder_leaves = False
        elif text_encoder_leaves is None:
            text_encoder_leaves = self.text_encoder_folder(model) is not None
        return dit_footprint(model, train_target=train_target, lora_targets=ATTENTION_TARGETS, lora_rank=lora_rank,
                             text_length=model.clamp_text_length(text_length), text_encoder_leaves=text_encoder_leaves,
                             text_encoder_frozen=self.text_encoder_unreached(model) if train_text_encoder else None)


class ZImageFamily(DiTFamily):
    name = "zimage"
    folder_classes = ("ZImagePipeline",)
    # No ControlNet img2img pipeline exists for these models (diffusers 0.42): (IMG2IMG, True) is refused by name.
    pipelines = {(TXT2IMG, False): "ZImagePipeline", (IMG2IMG, False): "ZImageImg2ImgPipeline",
                 (INPAINT, False): "ZImageInpaintPipeline", (TXT2IMG, True): "ZImageControlNetPipeline",
                 (INPAINT, True): "ZImageControlNetInpaintPipeline"}
    controlnet_class = "ZImageControlNetModel"
    multi_controlnet_class = ""  # ZImageControlNetPipeline runs one ControlNet
    own_guidance = "Z-Image's are cfg_truncation and cfg_normalization"
    own_settings = ("cfg_normalization", "cfg_truncation")

    def controlnet_kinds(self, model, controlnet):
        """Text-to-image with any (its pipeline pads the conditioning to the ControlNet's inputs); inpainting with one
        whose inputs are the conditioning image's latents, the mask and the masked image's latents
        (Z-Image-Fun-ControlNet-Union 2.x)."""
        inpaints = controlnet.config.control_in_dim == 2 * model.latent_channels + 1
        return (TXT2IMG, INPAINT) if inpaints else (TXT2IMG,)

    def pipeline(self, model, kind=TXT2IMG, controlnet=None, scheduler=None, base=None):
        _refuse_controlnet_kind(self, model, kind, controlnet)
        return super().pipeline(model, kind, controlnet, scheduler, base)

    def native_size(self, pipe) -> int:
        return int(getattr(pipe.vae.config, "sample_size", 0) or DEFAULT_IMAGE_SIZE)

    def latent_channels(self, pipe) -> int:
        return int(pipe.transformer.config.in_channels)

    def text_length_limit(self, pipe) -> int:
        return int(pipe.text_encoder.config.max_position_embeddings)

    def pipeline_arguments(self, model, prompts, generators, settings, max_length=None):
        """Z-Image's guidance runs with ``scale`` > 0 (its pipeline's rule: pos + scale × (pos - neg));
        ``cfg_truncation`` and ``cfg_normalization`` as its pipeline takes them."""
        return dict(super().pipeline_arguments(model, prompts, generators, settings, max_length),
                    negative_prompt=[settings.negative_prompt] * len(prompts), guidance_scale=settings.guidance_scale,
                    cfg_normalization=settings.cfg_normalization, cfg_truncation=settings.cfg_truncation)

    # ------------------------------------------------------------------------------------------ training
    def text_embeddings(self, model, captions, max_length):
        """The chat template, ``hidden_states[-2]``, the padding's tokens dropped
        (``ZImagePipeline._encode_prompt``)."""
        pipe = self.pipeline(model, TXT2IMG)
        embeds, _ = pipe.encode_prompt(list(captions), device=model.device, do_classifier_free_guidance=False,
                                       max_sequence_length=max_length)
        return list(embeds)

    def text_encoder_unreached(self, model):
        """``hidden_states[-2]`` is the input of the last decoder layer: that layer and the final norm."""
        return (f"layers.{model.text_encoder.config.num_hidden_layers - 1}.", "norm.")

    def embedded_prompt_arguments(self, model, arguments, texts):
        """``prompt_embeds`` and ``negative_prompt_embeds``: one (tokens, width) tensor per image (the pipeline uses
        the negative ones only when it guides)."""
        arguments = dict(arguments)
        prompts, negatives = arguments.pop("prompt"), arguments.pop("negative_prompt", None)
        arguments["prompt_embeds"] = [texts[prompt].to(model.device) for prompt in prompts]
        if negatives is not None:
            arguments["negative_prompt_embeds"] = [texts[negative].to(model.device) for negative in negatives]
        return arguments

    def training_latents(self, model, mean, logvar, eps):
        """The posterior's mode, shifted and scaled (train_dreambooth_lora_z_image.py)."""
        return (mean - model.vae.config.shift_factor) * model.vae.config.scaling_factor

    def predict_flow(self, model, noisy, timesteps, texts):
        """One (C, 1, h, w) latent per sample, the time as 1 - t / 1000, the prediction negated (Z-Image's
        transformer predicts latents - noise)."""
        transformer = model.transformer
        inputs = list(noisy.to(transformer.dtype).unsqueeze(2).unbind(dim=0))
        texts = [text.to(noisy.device, transformer.dtype) for text in texts]
        predictions = transformer(inputs, (1000 - timesteps) / 1000, texts, return_dict=False)[0]
        return -torch.stack(predictions, dim=0).squeeze(2)


def _refuse_controlnet_kind(family: DiTFamily, model, kind: str, controlnet) -> None:
    """A ControlNet asked for a kind its inputs have no place in (an inpainting ControlNet without a mask, a plain one
    with a mask) is a one-line error, not a shape mismatch deep in the pipeline."""
    if controlnet is None or kind not in (TXT2IMG, INPAINT):  # img2img: refused by name, no pipeline exists
        return
    kinds = family.controlnet_kinds(model, controlnet)
    if kind in kinds:
        return
    from easynlp_ldm.errors import UserError

    if kind == INPAINT:
        raise UserError(f"controlnet=: this {family.controlnet_class} has no inpainting inputs (the mask, the masked "
                        f"image): it conditions {' or '.join(kinds)} only; leave the mask out, or inpaint with an "
                        f"inpainting ControlNet")
    raise UserError(f"controlnet=: this {family.controlnet_class} is an inpainting ControlNet: give it an input image "
                    f"and its mask" + ("" if kinds else f" (and one at a time: {family.name} models inpaint with one)"))


def _padded_texts(texts: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-Image's text embeddings of a batch: each (tokens, width) tensor zero-padded to the longest, and the mask
    of its tokens (1) and padding (0), on ``device``."""
    longest = max(len(text) for text in texts)
    embeds = torch.stack([torch.cat([text, text.new_zeros(longest - len(text), text.shape[1])]) for text in texts])
    mask = torch.stack([torch.arange(longest) < len(text) for text in texts]).long()
    return embeds.to(device), mask.to(device)


class OneImagePerCall:
    """A pipeline run one image at a time, each call given that image's entry of every per-image argument, with
    torch's global generator seeded by the image's seed and restored after. For a pipeline that draws from the global
    generator besides the seeds' (``QwenImageControlNetInpaintPipeline`` samples its control image's VAE posterior
    so, diffusers 0.42): a seed then gives one image whatever the batch, the image diffusers' pipeline gives after
    ``torch.manual_seed(seed)``. For one that takes one prompt a call (``QwenImageEditPlusPipeline``, whose ``image``
    is the list of one prompt's reference pictures): each call is ``image=[its image]``. Everything else is the
    pipeline's."""

    # one entry per image
    BATCHED = ("prompt", "negative_prompt", "image", "control_image", "control_mask", "generator")

    def __init__(self, pipe):
        self.pipe = pipe

    def __getattr__(self, name: str):
        if name == "pipe":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.pipe, name)

    def __call__(self, **arguments):
        import numpy as np

        device = self.pipe._execution_device
        outputs = []
        for index, generator in enumerate(arguments["generator"]):
            one = {name: value[index:index + 1] if name in self.BATCHED and isinstance(value, list) else value
                   for name, value in arguments.items()}
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(generator.initial_seed())
                outputs.append(self.pipe(**one))
        return type(outputs[0])(images=np.concatenate([output.images for output in outputs]))


class QwenImageFamily(DiTFamily):
    name = "qwenimage"
    folder_classes = ("QwenImagePipeline",)
    pipelines = {(TXT2IMG, False): "QwenImagePipeline", (IMG2IMG, False): "QwenImageImg2ImgPipeline",
                 (INPAINT, False): "QwenImageInpaintPipeline", (TXT2IMG, True): "QwenImageControlNetPipeline",
                 (INPAINT, True): "QwenImageControlNetInpaintPipeline"}
    controlnet_class = "QwenImageControlNetModel"
    multi_controlnet_class = "QwenImageMultiControlNetModel"
    own_guidance = "Qwen-Image's is true_cfg_scale"
    own_settings = ("true_cfg_scale",)
    samplers = ("euler", "unipc")

    def latent_channels(self, pipe) -> int:
        return int(pipe.transformer.config.in_channels) // 4

    def text_length_limit(self, pipe) -> int:
        return int(pipe.tokenizer_max_length)

    def pipeline_arguments(self, model, prompts, generators, settings, max_length=None):
        """Classifier-free guidance is ``true_cfg_scale`` (> 1: with the negative prompt, empty or not); ``scale`` is
        the guidance input of a guidance-distilled transformer, and not passed to one that has none."""
        guided = settings.true_cfg_scale > 1
        distilled = bool(model.transformer.config.guidance_embeds)
        return dict(super().pipeline_arguments(model, prompts, generators, settings, max_length),
                    negative_prompt=[settings.negative_prompt] * len(prompts) if guided else None,
                    true_cfg_scale=settings.true_cfg_scale,
                    guidance_scale=settings.guidance_scale if distilled else None)

    def initial_latents(self, latents):
        """The seeds' noise, drawn per image as the pipeline draws it, packed into its 2×2 patches."""
        count, channels, rows, columns = latents.shape
        return self.pipeline_class(self.pipelines[TXT2IMG, False])._pack_latents(
            latents, count, channels, rows, columns)

    def controlnet_kinds(self, model, controlnet):
        """An inpainting ControlNet (more inputs than the latents: the mask's) inpaints only, one at a time; the
        others condition text-to-image only."""
        nets = getattr(controlnet, "nets", [controlnet])
        if any(net.config.extra_condition_channels for net in nets):
            return (INPAINT,) if len(nets) == 1 else ()
        return (TXT2IMG,)

    def pipeline(self, model, kind=TXT2IMG, controlnet=None, scheduler=None, base=None):
        """Inpainting with a ControlNet seeded per image (``OneImagePerCall``)."""
        _refuse_controlnet_kind(self, model, kind, controlnet)
        pipe = super().pipeline(model, kind, controlnet, scheduler, base)
        return OneImagePerCall(pipe) if kind == INPAINT and controlnet is not None else pipe

    def image_arguments(self, model, kind, **given):
        """Inpainting with a ControlNet: the pipeline takes no init image; its ControlNet (InstantX's inpainting
        ControlNet) reads the image it repaints under the mask, as ``control_image`` and ``control_mask``, so the
        conditioning image must be that image (one ControlNet)."""
        arguments = super().image_arguments(model, kind, **given)
        if kind != INPAINT or given["controls"] is None:
            return arguments
        from easynlp_ldm.errors import UserError

        images, controls = arguments.pop("image"), arguments["control_image"]  # one ControlNet (controlnet_kinds)
        if any(image.tobytes() != control.tobytes() for image, control in zip(images, controls)):
            raise UserError(f"{self.name} models inpaint with a ControlNet that reads the image it repaints under "
                            f"the mask: give that image as the conditioning image too (the control column, "
                            f"control_image)")
        arguments["control_mask"] = arguments.pop("mask_image")
        return arguments

    # ------------------------------------------------------------------------------------------ training
    def text_embeddings(self, model, captions, max_length):
        """The prompt template, the last hidden layer, the template's first tokens and the padding dropped
        (``QwenImagePipeline.encode_prompt``)."""
        pipe = self.pipeline(model, TXT2IMG)
        embeds, mask = pipe.encode_prompt(list(captions), device=model.device, max_sequence_length=max_length)
        lengths = mask.sum(dim=1).tolist() if mask is not None else [embeds.shape[1]] * len(captions)
        return [embed[:int(length)] for embed, length in zip(embeds, lengths)]

    def text_encoder_unreached(self, model):
        """Qwen2.5-VL's vision tower and its language-model head: prompts are text, read from the hidden states."""
        return ("model.visual.", "lm_head.")

    def embedded_prompt_arguments(self, model, arguments, texts):
        """``prompt_embeds`` with ``prompt_embeds_mask`` (zero-padded to the longest, as the pipeline encodes a
        batch), and the negative prompts' where true CFG runs."""
        arguments = dict(arguments)
        prompts, negatives = arguments.pop("prompt"), arguments.pop("negative_prompt", None)
        for key, captions in (("prompt_embeds", prompts), ("negative_prompt_embeds", negatives)):
            if captions is not None:
                arguments[key], arguments[f"{key}_mask"] = _padded_texts([texts[caption] for caption in captions],
                                                                         model.device)
        return arguments

    def vae_moments(self, model, pixels):
        """Qwen-Image's VAE takes (and gives) one-frame videos: (N, C, 1, H, W)."""
        return model.vae.encode(pixels.unsqueeze(2)).latent_dist.parameters.squeeze(2)

    def training_latents(self, model, mean, logvar, eps):
        """A posterior sample, normalised by the VAE's latents_mean / latents_std (train_dreambooth_lora_qwen_image.py
        samples the posterior; ``eps`` is the seeded draw)."""
        latents = mean if eps is None else mean + torch.exp(0.5 * logvar) * eps.to(mean.device, mean.dtype)
        config = model.vae.config
        shape = (1, config.z_dim, 1, 1)
        latents_mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return (latents - latents_mean) * latents_std

    def predict_flow(self, model, noisy, timesteps, texts):
        """Latents packed into 2×2 patches, the texts zero-padded with their mask (none when all are as long), the
        time as t / 1000, the prediction unpacked."""
        pipeline_class = self.pipeline_class(self.pipelines[TXT2IMG, False])
        transformer = model.transformer
        count, channels, rows, columns = noisy.shape
        packed = pipeline_class._pack_latents(noisy.to(transformer.dtype), count, channels, rows, columns)
        embeds, mask = _padded_texts(texts, noisy.device)
        embeds = embeds.to(transformer.dtype)
        prediction = transformer(hidden_states=packed, encoder_hidden_states=embeds,
                                 encoder_hidden_states_mask=None if bool(mask.all()) else mask,
                                 timestep=timesteps / 1000, img_shapes=[(1, rows // 2, columns // 2)] * count,
                                 return_dict=False)[0]
        factor = model.vae_scale_factor
        return pipeline_class._unpack_latents(prediction, rows * factor, columns * factor, factor).squeeze(2)


ZIMAGE = ZImageFamily()
QWENIMAGE = QwenImageFamily()


class QwenImageEditFamily(QwenImageFamily):
    """Qwen-Image-Edit: a Qwen-Image whose pipeline edits an input image by an instruction (``QwenImageEditPipeline``:
    the image is read by the text encoder's vision tower through the folder's ``processor`` and its latents sit beside
    the noise). The instruction is the prompt; the image comes where img2img's does (predict's input image column,
    the request's image), with a mask through ``QwenImageEditInpaintPipeline``. Nothing is generated from text alone,
    ``strength`` is not taken (the edit redraws the whole image; inpainting repaints the mask fully), and training is
    not offered."""

    name = "qwenimage-edit"
    folder_classes = ("QwenImageEditPipeline",)
    # The text-to-image entry is the family's base pipeline (LoRA loading, components); it refuses to run without an
    # image (``txt2img_arguments``).
    pipelines = {(TXT2IMG, False): "QwenImageEditPipeline", (IMG2IMG, False): "QwenImageEditPipeline",
                 (INPAINT, False): "QwenImageEditInpaintPipeline"}
    needs_input_image = True  # serve's warm-up request brings one
    train_targets = ()

    def own_components(self, folder: str) -> dict[str, Any]:
        """The processor, read without torchvision (modelzoo/qwen_vl_processor.py)."""
        from modelzoo.qwen_vl_processor import load_processor

        return {"processor": load_processor(os.path.join(folder, "processor"))}

    def save(self, model: DiTModel, folder: str, **options) -> list[str]:
        """The processor's subfolder first, then the rest as for Qwen-Image (``model_index.json`` last)."""
        from easynlp_ldm.files import atomic_replace_folder

        os.makedirs(folder, exist_ok=True)
        with atomic_replace_folder(os.path.join(folder, "processor")) as staging, _quiet_loading():
            model.processor.save_pretrained(staging)
        written = [os.path.join(folder, "processor", file) for file in sorted(os.listdir(os.path.join(folder,
                                                                                                      "processor")))]
        return written + super().save(model, folder, **options)

    def pipeline_components(self, model: DiTModel, scheduler) -> dict[str, Any]:
        return dict(super().pipeline_components(model, scheduler), processor=model.processor)

    def sampling_problem(self, settings, model) -> str | None:
        if settings.strength:
            return (f"strength={settings.strength:g}: {self.name} models take no strength (the edit redraws the "
                    f"whole image; inpainting repaints the mask fully); leave it out")
        return super().sampling_problem(settings, model)

    def txt2img_arguments(self, model, settings, height, width, latents):
        from easynlp_ldm.errors import UserError

        raise UserError(f"{self.name} models edit an input image by the instruction: give the image (predict: the "
                        f"input image column, imgbase64 or --second_sequence; serve: the request's image)")

    def image_arguments(self, model, kind, **given):
        """As Qwen-Image's, without img2img's ``strength`` (the edit pipeline takes none)."""
        arguments = super().image_arguments(model, kind, **given)
        if kind == IMG2IMG:
            arguments.pop("strength", None)
        return arguments


QWENIMAGE_EDIT = QwenImageEditFamily()


class QwenImageEditPlusFamily(QwenImageEditFamily):
    """Qwen-Image-Edit-Plus (Qwen-Image-Edit-2509, -2511): a Qwen-Image-Edit whose pipeline
    (``QwenImageEditPlusPipeline``) edits by one instruction at a time with a list of reference pictures. Here each
    prompt's reference is its own input image (a table has one image column; a request one image), so the pipeline is
    called once per image (``OneImagePerCall``): ``image=[the prompt's image]``, the prompt, its seed's generator.
    No inpainting pipeline exists for it (diffusers 0.42)."""

    name = "qwenimage-edit-plus"
    folder_classes = ("QwenImageEditPlusPipeline",)
    pipelines = {(TXT2IMG, False): "QwenImageEditPlusPipeline", (IMG2IMG, False): "QwenImageEditPlusPipeline"}

    def pipeline(self, model, kind=TXT2IMG, controlnet=None, scheduler=None, base=None):
        """The edit one image per call; the text-to-image entry (components, LoRA loading) as it is."""
        pipe = super().pipeline(model, kind, controlnet, scheduler, base)
        return pipe if kind == TXT2IMG else OneImagePerCall(pipe)


QWENIMAGE_EDIT_PLUS = QwenImageEditPlusFamily()
