"""The SD-1.x latent diffusion model: Chinese text encoder + diffusers ``UNet2DConditionModel`` + ``AutoencoderKL`` +
the noise schedule of its scheduler config, with optional ESRGAN ×4 weights.

Two on-disk formats, one ``save_pretrained`` ⇄ ``from_pretrained`` pair:

* **diffusers layout**, as PAI publishes it: ``model_index.json``, ``tokenizer/vocab.txt``, ``text_encoder/``,
  ``unet/``, ``vae/``, ``scheduler/`` (weights ``.bin`` or ``.safetensors``), optional ``RRDB_ESRGAN_x4.pth``.
* **this toolkit's checkpoint**: ``config.json`` (every component's config, tokenizer settings, native image size,
  scheduler config, format version), ``pytorch_model.bin`` (one plain state dict, keys prefixed ``text_encoder.``,
  ``unet.``, ``vae.``), ``vocab.txt`` and ``RRDB_ESRGAN_x4.pth`` when the model has one — the files EasyNLP's
  packaging command ``tar czf … config.json pytorch_model.bin RRDB_ESRGAN_x4.pth vocab.txt`` expects.

and EasyNLP's own latent_diffusion checkpoint (the same file names, a CompVis ``config.json`` with a top-level
``"model"`` key), read and written by ``modelzoo.formats.easynlp``: a model read from one is saved as one.
"""

from __future__ import annotations

import copy
import json
import logging
import os

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from easynlp_ldm.files import atomic_copy, atomic_torch_save, atomic_write_text, load_state_dict_file
from modelzoo import text_encoder as te
from modelzoo.families.base import ModelFormatError
from modelzoo.weights import load_component_weights

logger = logging.getLogger(__name__)

FORMAT_NAME = "easynlp-ldm"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "pytorch_model.bin"
VOCAB_NAME = "vocab.txt"
ESRGAN_NAME = "RRDB_ESRGAN_x4.pth"
CHECKPOINT_FILES = (CONFIG_NAME, WEIGHTS_NAME, VOCAB_NAME)
COMPONENTS = ("text_encoder", "unet", "vae")
# model_index.json key of a diffusers-layout folder: the channel order RRDB_ESRGAN_x4.pth expects (diffusers ignores
# keys starting with "_"); absent: rgb, the original ESRGAN's.
DIFFUSERS_ESRGAN_ORDER = "_esrgan_channel_order"


def _clean_diffusers_config(config: dict) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def is_diffusers_layout(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json")) or os.path.isdir(os.path.join(path, "unet"))


def is_own_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_NAME)) and os.path.isfile(os.path.join(path, WEIGHTS_NAME))


class LatentDiffusion(torch.nn.Module):
    family = "sd"

    """Components as plain attributes; ``esrgan_path`` points at ×4 super-resolution weights when the model has them.
    Loaded and saved by its family, ``modelzoo.families.sd`` (``sd.load(folder)``, ``sd.save(model, folder)``).

    ``image_size``: native resolution in pixels. ``text_max_length``: tokens per prompt (the tokenizer's
    ``model_max_length`` clamped to the encoder's position table).
    """

    def __init__(self, tokenizer, text_encoder, unet: UNet2DConditionModel, vae: AutoencoderKL, scheduler_config: dict,
                 image_size: int | None = None, esrgan_path: str | None = None, extra: dict | None = None):
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.vae = vae
        self.scheduler_config = _clean_diffusers_config(scheduler_config)
        self.scheduler_class = scheduler_config.get("_class_name", "DPMSolverMultistepScheduler")
        self.image_size = int(image_size or unet.config.sample_size * self.vae_scale_factor)
        self.esrgan_path = esrgan_path
        self.extra = dict(extra or {})
        limit = te.position_limit(text_encoder)
        wanted = tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else limit
        self.text_max_length = min(int(wanted), limit)

    # ---------------------------------------------------------------------------------------------- geometry
    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the UNet denoises (what it predicts: an inpainting UNet takes 9 in, gives 4)."""
        return int(self.unet.config.out_channels)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def clamp_text_length(self, requested: int | None) -> int:
        """Tokens per prompt: ``requested`` (``--sequence_length``) or the model's own, never past the encoder's
        position table (PAI's tutorial passes 288 to a 32-position encoder)."""
        limit = te.position_limit(self.text_encoder)
        if requested is None:
            return self.text_max_length
        if requested > limit:
            logger.warning("--sequence_length=%d exceeds the text encoder's %d positions; using %d", requested,
                           limit, limit)
            return limit
        return int(requested)

    # ------------------------------------------------------------------------------------------------- text
    def tokenize(self, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
        return te.tokenize(self.tokenizer, prompts, max_length or self.text_max_length)

    def encode_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return te.encode_tokens(self.text_encoder, input_ids, self.tokenizer.pad_token_id)

    def encode_prompts(self, prompts: list[str], max_length: int | None = None) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(prompts, max_length))

    # ------------------------------------------------------------------------------------------ save/load
    def config_dict(self) -> dict:
        text_class, text_config = te.text_encoder_config(self.text_encoder)
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "image_size": self.image_size,
            "vae_scale_factor": self.vae_scale_factor,
            "text_max_length": self.text_max_length,
            "tokenizer": te.tokenizer_settings(self.tokenizer),
            "text_encoder": {"class": text_class, "config": text_config},
            "unet": {"class": "UNet2DConditionModel", "config": _clean_diffusers_config(self.unet.config)},
            "vae": {"class": "AutoencoderKL", "config": _clean_diffusers_config(self.vae.config)},
            "scheduler": {"class": self.scheduler_class, "config": copy.deepcopy(self.scheduler_config)},
            "esrgan": {"file": ESRGAN_NAME, "channel_order": self.extra.get("esrgan_channel_order", "rgb")}
            if self.esrgan_path else None,
            "extra": self.extra,
        }

    def component_state_dict(self, overrides: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """One plain state dict of all components; ``overrides`` (e.g. EMA weights) replace matching keys. CPU
        tensors are the live weights, not copies (a save of a real-size model would otherwise hold a second model in
        memory): write them out before the weights change again."""
        state = {}
        for name in COMPONENTS:
            for key, value in getattr(self, name).state_dict().items():
                state[f"{name}.{key}"] = value.detach().cpu()
        for key, value in (overrides or {}).items():
            if key not in state:
                raise KeyError(f"override {key} is not a weight of the model")
            state[key] = value.detach().cpu().to(state[key].dtype)
        return state

    # ------------------------------------------------------------------------------------------ devices
    @property
    def device(self) -> torch.device:
        """Where the denoiser runs (the device generation and training compute on)."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype


def save_checkpoint(model: LatentDiffusion, folder: str, overrides: dict[str, torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None) -> list[str]:
    """The model in this toolkit's checkpoint format (``FORMAT_NAME``)."""
    config = model.config_dict()
    config["extra"] = {k: v for k, v in config["extra"].items() if k != "source_format"}
    return write_checkpoint(model, folder, config, model.component_state_dict(overrides), dtype)


def write_checkpoint(model: LatentDiffusion, folder: str, config: dict, state: dict[str, torch.Tensor],
                     dtype: torch.dtype | None = None) -> list[str]:
    """``config.json``, ``vocab.txt``, ``RRDB_ESRGAN_x4.pth`` (when the model has one) and ``pytorch_model.bin``
    (``state``, floats cast to ``dtype``) in ``folder``, each replaced atomically, weights last. Returns the files."""
    os.makedirs(folder, exist_ok=True)
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    atomic_write_text(os.path.join(folder, CONFIG_NAME),
                      json.dumps(config, ensure_ascii=False, indent=2, default=_json_default))
    atomic_write_text(os.path.join(folder, VOCAB_NAME), te.vocab_lines(model.tokenizer))
    files = [os.path.join(folder, CONFIG_NAME), os.path.join(folder, VOCAB_NAME)]
    if model.esrgan_path:
        target = os.path.join(folder, ESRGAN_NAME)
        if os.path.abspath(model.esrgan_path) != os.path.abspath(target):
            atomic_copy(model.esrgan_path, target)
        files.append(target)
    atomic_torch_save(state, os.path.join(folder, WEIGHTS_NAME))
    return files + [os.path.join(folder, WEIGHTS_NAME)]


def _json_default(value):
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, float):
        return value
    return str(value)


def _esrgan_file(path: str) -> str | None:
    candidate = os.path.join(path, ESRGAN_NAME)
    return candidate if os.path.isfile(candidate) else None


def _load_strict(module: torch.nn.Module, state: dict, where: str) -> None:
    """``state`` becomes the module's weights (``assign``: the loaded tensors, in the module's dtypes, replace the
    freshly initialised ones, so loading never holds two copies of the weights)."""
    reference = module.state_dict()
    state = {k: v.to(reference[k].dtype) if k in reference and v.dtype != reference[k].dtype else v
             for k, v in state.items()}
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    # Position-id buffers are recomputed by transformers and absent from some files.
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        problem = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise ModelFormatError(f"{where}: weights do not match the config ({problem})")


def _current_text_encoder_names(module: torch.nn.Module, state: dict) -> dict:
    """transformers 4.x names CLIPTextModel's weights ``text_model.…`` (PAI's folders, our diffusers export); the
    installed transformers has no such wrapper module (5.x dropped it), so the prefix goes, as transformers' own
    loader renames it."""
    prefix = "text_model."
    if hasattr(module, "text_model"):
        return state
    return {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{path}: not valid JSON ({err})") from None


def load_diffusers_layout(path: str) -> LatentDiffusion:
    for part in ("tokenizer", "text_encoder", "unet", "vae", "scheduler"):
        if not os.path.isdir(os.path.join(path, part)):
            raise ModelFormatError(f"{path}: diffusers layout without {part}/")
    index = {}
    if os.path.isfile(os.path.join(path, "model_index.json")):
        index = _read_json(os.path.join(path, "model_index.json"))
    tokenizer = te.load_tokenizer_folder(os.path.join(path, "tokenizer"))
    text_config = _read_json(os.path.join(path, "text_encoder", "config.json"))
    text_class = (index.get("text_encoder") or [None, None])[1] or (text_config.get("architectures") or
                                                                     ["CLIPTextModel"])[0]
    text_encoder = te.build_text_encoder(text_class, text_config)
    _load_strict(text_encoder, _current_text_encoder_names(text_encoder, load_component_weights(
        os.path.join(path, "text_encoder"))), f"{path}/text_encoder")
    unet = UNet2DConditionModel.from_config(_read_json(os.path.join(path, "unet", "config.json")))
    _load_strict(unet, load_component_weights(os.path.join(path, "unet")), f"{path}/unet")
    vae = AutoencoderKL.from_config(_read_json(os.path.join(path, "vae", "config.json")))
    _load_strict(vae, load_component_weights(os.path.join(path, "vae")), f"{path}/vae")
    scheduler_config = _read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    esrgan_path = _esrgan_file(path)
    extra = {"esrgan_channel_order": index[DIFFUSERS_ESRGAN_ORDER]} if esrgan_path and index.get(
        DIFFUSERS_ESRGAN_ORDER) in ("rgb", "bgr") else {}
    return LatentDiffusion(tokenizer, text_encoder, unet, vae, scheduler_config, esrgan_path=esrgan_path, extra=extra)


def load_checkpoint(path: str) -> LatentDiffusion:
    config = _read_json(os.path.join(path, CONFIG_NAME))
    if config.get("format") != FORMAT_NAME:
        raise ModelFormatError(f"{path}/{CONFIG_NAME}: not an easynlp-ldm checkpoint config")
    if int(config.get("format_version", 0)) > FORMAT_VERSION:
        raise ModelFormatError(f"{path}: checkpoint format {config['format_version']} is newer than this toolkit "
                               f"reads ({FORMAT_VERSION}); upgrade easynlp-ldm")
    vocab = os.path.join(path, VOCAB_NAME)
    if not os.path.isfile(vocab):
        raise ModelFormatError(f"{path}: {VOCAB_NAME} missing")
    tokenizer = te.load_tokenizer(vocab, config.get("tokenizer"))
    text_encoder = te.build_text_encoder(config["text_encoder"]["class"], config["text_encoder"]["config"])
    unet = UNet2DConditionModel.from_config(config["unet"]["config"])
    vae = AutoencoderKL.from_config(config["vae"]["config"])
    state = load_state_dict_file(os.path.join(path, WEIGHTS_NAME))
    for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        prefix = name + "."
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        reference = module.state_dict()
        part = {k: v.to(reference[k].dtype) if k in reference else v for k, v in part.items()}
        _load_strict(module, part, f"{path}/{WEIGHTS_NAME} [{name}]")
    scheduler = dict(config["scheduler"]["config"])
    scheduler["_class_name"] = config["scheduler"].get("class", "DPMSolverMultistepScheduler")
    model = LatentDiffusion(tokenizer, text_encoder, unet, vae, scheduler, image_size=config.get("image_size"),
                            esrgan_path=_esrgan_file(path), extra=config.get("extra"))
    if config.get("text_max_length"):
        model.text_max_length = min(int(config["text_max_length"]), te.position_limit(text_encoder))
    return model
