"""LoRA adapters, on peft as diffusers does: added for training, saved in diffusers' LoRA format
(``pytorch_lora_weights.safetensors``, which ``pipe.load_lora_weights`` loads as it is, with the adapter's config in
the file's metadata), and applied for inference — one or several, each with its scale, merged into the weights
(``fuse``) or kept switchable, on the denoiser the model's family names. diffusers reads kohya-ss / WebUI files too,
and for Z-Image / Qwen-Image musubi and ComfyUI files (it converts them)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch

from easynlp_ldm.errors import UserError
from easynlp_ldm.files import atomic_files
from modelzoo.families import family_of
from modelzoo.families.base import TXT2IMG

LORA_FILE = "pytorch_lora_weights.safetensors"
ADAPTER = "default"  # peft's name for the adapter being trained


@dataclass(frozen=True)
class LoraSpec:
    path: str  # a .safetensors file, or a folder holding pytorch_lora_weights.safetensors
    scale: float = 1.0


def parse_specs(text: str, what: str = "lora") -> tuple[LoraSpec, ...]:
    """``path[:scale],path[:scale]`` → specs; a missing file or a bad scale is a ``UserError`` naming it."""
    specs = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        path, scale = item, 1.0
        head, sep, tail = item.rpartition(":")
        if sep and head and not os.path.exists(item):
            try:
                path, scale = head, float(tail)
            except ValueError:
                raise UserError(f"{what}: {item!r}: the scale after ':' must be a number") from None
        if not os.path.exists(path):
            raise UserError(f"{what}: {path} does not exist (give a LoRA .safetensors file or a folder with "
                            f"{LORA_FILE})")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, LORA_FILE)):
            raise UserError(f"{what}: {path} has no {LORA_FILE}")
        if os.path.isfile(path) and not path.endswith(".safetensors"):
            raise UserError(f"{what}: {path}: LoRA files are read as .safetensors only (never unpickled)")
        specs.append(LoraSpec(path, scale))
    return tuple(specs)


def parse_library(text: str, what: str = "lora_library") -> dict[str, LoraSpec]:
    """``name=path,name=path`` → {name: spec}: the adapters a service loads once and requests choose from."""
    library: dict[str, LoraSpec] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, sep, path = item.partition("=")
        if not sep or not name.isidentifier():
            raise UserError(f"{what}: {item!r} is not name=path (names are letters, digits and _)")
        if name in library:
            raise UserError(f"{what}: the name {name!r} is given twice")
        library[name] = parse_specs(path, what)[0]
    return library


# ------------------------------------------------------------------------------------------------- training
def target_modules(text: str, model) -> tuple[str, ...]:
    """Names of the family's target groups (``attention``, ``ff`` for SD-1.x) and module names, separated by commas →
    module names of ``model``'s denoiser."""
    groups = family_of(model).lora_targets
    names: list[str] = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        names += [name for name in groups.get(item, (item,)) if name not in names]
    if not names:
        raise UserError(f"lora_target_modules is empty; use {', '.join(groups)} or module names")
    return tuple(names)


def add_training_adapters(model, rank: int, alpha: float, dropout: float, targets: tuple[str, ...],
                          text_encoder: bool) -> int:
    """Freeze the model and add a trainable LoRA adapter to the denoiser's ``targets`` (and the text encoder's
    attention, the family's ``text_encoder_lora_targets``, when ``text_encoder``); returns the number of trainable
    parameters."""
    from peft import LoraConfig

    family = family_of(model)
    denoiser = getattr(model, family.denoiser)
    denoiser.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    config = dict(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian")
    try:
        with warnings.catch_warnings():  # a quantised base (modelzoo/lowbit.py): the adapter is saved alone, not merged
            warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
            denoiser.add_adapter(LoraConfig(target_modules=list(targets), **config))
    except ValueError as err:
        raise UserError(f"lora_target_modules: {err}") from None
    if text_encoder:
        if not hasattr(model.text_encoder, "add_adapter"):
            raise UserError(f"lora_text_encoder=True: the text encoder ({type(model.text_encoder).__name__}) takes no "
                            "peft adapter; train the UNet's LoRA alone")
        add_text_encoder_adapter(model.text_encoder, LoraConfig(target_modules=list(family.text_encoder_lora_targets),
                                                                **config))
    return sum(p.numel() for module in (denoiser, model.text_encoder) for p in module.parameters()
               if p.requires_grad)


def add_text_encoder_adapter(text_encoder, config) -> None:
    """``text_encoder.add_adapter(config)`` as diffusers' LoRA script calls it, through peft itself: transformers 5's
    ``add_adapter`` refuses peft releases before 0.22 (none is published yet), while peft injects the same LoRA
    layers under the same names; ``peft_config`` is recorded as transformers records it."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name=ADAPTER)
    text_encoder.peft_config = {ADAPTER: config}
    text_encoder._hf_peft_config_loaded = True


def _peft_state(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Trainer weights (``unet.<module>.lora_A.default.weight``) → peft's state dict of one component."""
    return {name[len(prefix):].replace(f".{ADAPTER}.", "."): tensor.detach().cpu().contiguous()
            for name, tensor in weights.items() if name.startswith(prefix)}


def _metadata(config) -> dict:
    """An adapter's config for the file's metadata, its sets (``target_modules``) as sorted lists: a set's order
    changes with each process's string hashing, and the same run would otherwise write other bytes."""
    return {key: sorted(value) if isinstance(value, (set, frozenset)) else value
            for key, value in config.to_dict().items()}


def save_adapters(folder: str, model, weights: dict[str, torch.Tensor]) -> list[str]:
    """``weights`` (the trainer's, EMA applied) → ``folder/pytorch_lora_weights.safetensors`` in diffusers' format,
    written atomically; returns the files written."""
    from diffusers.utils import convert_state_dict_to_diffusers

    denoiser = family_of(model).denoiser
    if denoiser != "unet":  # a transformer's adapter, saved as diffusers' DreamBooth-LoRA scripts for DiTs save it
        with atomic_files(folder) as staging:
            _pipeline_class(model).save_lora_weights(
                staging, safe_serialization=True, **{
                    f"{denoiser}_lora_layers": _peft_state(weights, f"{denoiser}."),
                    f"{denoiser}_lora_adapter_metadata": _metadata(getattr(model, denoiser).peft_config[ADAPTER])})
        return [os.path.join(folder, LORA_FILE)]
    unet = convert_state_dict_to_diffusers(_peft_state(weights, "unet."))
    text_state = _peft_state(weights, "text_encoder.")
    text = convert_state_dict_to_diffusers(text_state) if text_state else None
    with atomic_files(folder) as staging:
        _pipeline_class(model).save_lora_weights(
            staging, unet_lora_layers=unet, text_encoder_lora_layers=text, safe_serialization=True,
            unet_lora_adapter_metadata=_metadata(model.unet.peft_config[ADAPTER]),
            text_encoder_lora_adapter_metadata=_metadata(model.text_encoder.peft_config[ADAPTER]) if text else None)
    return [os.path.join(folder, LORA_FILE)]


# ------------------------------------------------------------------------------------------------ inference
def _pipeline_class(model):
    """The family's text-to-image pipeline class: diffusers' LoRA loading and saving are its class methods."""
    family = family_of(model)
    return family.pipeline_class(family.pipelines[(TXT2IMG, False)])


def _pipeline(model):
    return _lora_modules(family_of(model).pipeline(model, TXT2IMG))


def _lora_modules(pipe):
    """diffusers' LoRA methods treat a text encoder that is a diffusers model (EasyNLP's Wukong encoder) as one with
    peft adapters, and fail on it; such an encoder takes no LoRA (adapters train the UNet), so leave it out."""
    from transformers import PreTrainedModel

    if not isinstance(pipe.text_encoder, PreTrainedModel):
        pipe._lora_loadable_modules = [name for name in pipe._lora_loadable_modules if name != "text_encoder"]
    return pipe


def load_adapters(model, specs: tuple[LoraSpec, ...], fuse: bool = True, names: list[str] | None = None) -> list[str]:
    """Load ``specs`` into ``model`` (diffusers' loader: its own format, peft's, kohya-ss / WebUI), weighted by their
    scales; ``fuse`` merges them into the weights and drops the adapter layers (the model is then a plain model:
    every optimisation applies, nothing can be switched); otherwise they stay, named ``names``, for
    ``set_adapters`` per request (and fused QKV/GEGLU projections are then left out). Returns the adapter names."""
    from diffusers.utils import logging as diffusers_logging

    pipe = _pipeline(model)
    names = list(names) if names else [f"merged{i}" for i in range(len(specs))]
    for spec, name in zip(specs, names):
        folder, weight = (spec.path, LORA_FILE) if os.path.isdir(spec.path) else os.path.split(spec.path)
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder": most adapters have none
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")  # several adapters
                pipe.load_lora_weights(folder or ".", weight_name=weight, adapter_name=name)
        except (ValueError, KeyError, RuntimeError, OSError) as err:
            raise UserError(f"lora: {spec.path}: cannot load it as a LoRA for this model ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:300]})") from None
        finally:
            diffusers_logging.set_verbosity(verbosity)
    if names and fuse:
        pipe.set_adapters(names, adapter_weights=[spec.scale for spec in specs])
        pipe.fuse_lora(components=list(pipe._lora_loadable_modules), adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    elif names:
        pipe.disable_lora()  # until a request chooses some (select_adapters)
    return names


def has_adapters(module) -> bool:
    return bool(getattr(module, "peft_config", None))


def select_adapters(pipe, chosen: tuple[tuple[str, float], ...]) -> None:
    """Switch the switchable adapters of ``pipe``'s model to ``chosen`` ((name, scale), …; empty: none)."""
    _lora_modules(pipe)
    if not has_adapters(pipe.unet):
        if chosen:
            raise UserError("no LoRA adapters are loaded to choose from")
        return
    if not chosen:
        pipe.disable_lora()
        return
    pipe.enable_lora()
    pipe.set_adapters([name for name, _ in chosen], adapter_weights=[scale for _, scale in chosen])
