"""``--mode=export``: package a model for deployment.

* ``export_format=tar`` (default): a ``.tar.gz`` holding exactly the deployable files at its top level —
  ``config.json``, ``pytorch_model.bin``, ``vocab.txt`` and ``RRDB_ESRGAN_x4.pth`` when the model has one (what
  EasyNLP's ``tar czf finetuned_model.tar.gz config.json pytorch_model.bin RRDB_ESRGAN_x4.pth vocab.txt`` made).
  ``--mode=serve --checkpoint_dir=PACKAGE.tar.gz`` serves it.
* ``export_format=diffusers``: a folder ``StableDiffusionPipeline.from_pretrained`` loads, generating the same images
  as predict for the same seed (``tokenizer/`` also carries ``vocab.txt``, as PAI's folders do). A
  ``CLIPTextModel`` text encoder is written under the weight names transformers 4.x uses (``text_model.…``), which
  the current transformers still maps on load, so both load the same weights (``legacy_text_encoder_weights``).
  EasyNLP's Wukong text encoder is no transformers class: it is saved as a diffusers model with its code
  (``text_encoder/wukong.py``, ``model_index.json`` ``["wukong", "WukongTextEncoder"]``), which
  ``StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads; this toolkit builds the class by
  name and never runs the folder's code. ``_esrgan_channel_order`` in ``model_index.json`` keeps the ESRGAN's order.
* ``export_format=easynlp``: a folder in EasyNLP's own latent_diffusion format (CompVis ``config.json``,
  ``pytorch_model.bin``, ``vocab.txt``, ``RRDB_ESRGAN_x4.pth``) that EasyNLP's ``LatentDiffusion`` loads; only for
  models conditioned by EasyNLP's Wukong text encoder (``modelzoo.formats.easynlp``).
* Z-Image and Qwen-Image: ``export_format=diffusers`` is the family's own folder (its ``save``), loaded back by the
  family's diffusers pipeline; ``export_format=tar`` (the default) packs that folder (``model_index.json`` and its
  component folders at the top of the archive), which ``--checkpoint_dir=PACKAGE.tar.gz`` loads in every mode and
  which is unpacked and checked as the folder is; ``export_format=easynlp`` is refused (EasyNLP's format holds SD-1.x
  models only); ``lora_format=comfyui`` writes the LoRA given as ``lora=`` (instead of the model) as
  one file in ComfyUI's key layout (``modelzoo.formats.comfyui_lora``), checked by diffusers' loader reading it back
  to the same weight changes.

Every export loads what it wrote before it is in place — with diffusers' ``StableDiffusionPipeline.from_pretrained``
(and this toolkit) for a diffusers folder, with this toolkit's loader otherwise — and compares weights, tokenisation
and a prompt's encoding with the model; a difference is an error and nothing is left at ``--outputs``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import tarfile
import tempfile
from typing import Any

import torch

from appzoo.latent_diffusion.loading import load_model
from appzoo.latent_diffusion.settings import InferenceSettings
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.files import atomic_copy, atomic_folder, atomic_open, atomic_write_bytes, atomic_write_text
from modelzoo import families
from modelzoo import text_encoder as te
from modelzoo import wukong as wukong_code
from modelzoo.families.base import TXT2IMG, ModelFormatError
from modelzoo.formats.comfyui_lora import diffusers_to_comfyui, module_deltas, transformer_config
from modelzoo.formats.easynlp import FORMAT as EASYNLP_FORMAT
from modelzoo.formats.easynlp import NotExpressible
from modelzoo.ldm import CHECKPOINT_FILES, DIFFUSERS_ESRGAN_ORDER, ESRGAN_NAME
from modelzoo.lora import LORA_FILE, parse_specs
from modelzoo.weights import find_weights

logger = logging.getLogger("easynlp.export")

# transformers 5 dropped the ``text_model`` wrapper module inside CLIPTextModel and saves its weights without the
# prefix; transformers 4.x only reads the prefixed names (unprefixed ones load as random weights, with no error),
# and 5.x renames the prefixed ones on load (its conversion_mapping: PrefixChange(prefix_to_remove="text_model")).
LEGACY_TEXT_ENCODER_PREFIX = {"CLIPTextModel": "text_model."}
WUKONG_MODULE = "wukong"  # text_encoder/wukong.py of an exported folder: modelzoo/wukong.py, for trust_remote_code
# Why a format is refused for the families that do not offer it: what it can hold.
FORMAT_LIMITS = {"easynlp": "EasyNLP's latent_diffusion format holds SD-1.x models only"}


def export_tar(model, destination: str) -> list[str]:
    """A ``.tar.gz`` of the family's own save at its top level: EasyNLP's checkpoint files for SD-1.x, the whole
    diffusers folder (``model_index.json`` and a folder per component) for a family whose own format is one
    (Z-Image, Qwen-Image). Unpacked and checked as that format's export is before it is put in place."""
    own_diffusers_folder = families.family_of(model).denoiser != "unet"
    with tempfile.TemporaryDirectory() as folder:
        families.save(model, folder)
        if own_diffusers_folder:
            names = sorted(os.listdir(folder))  # tarfile adds a folder's files recursively, in sorted order
        else:
            names = list(CHECKPOINT_FILES) + ([ESRGAN_NAME] if model.esrgan_path else [])
        with atomic_open(destination, "wb") as handle:
            with tarfile.open(fileobj=handle, mode="w:gz") as archive:
                for name in names:
                    archive.add(os.path.join(folder, name), arcname=name)
            handle.flush()
            # The package as written (still under its temporary name): what --mode=serve unpacks and loads.
            with tempfile.TemporaryDirectory() as unpacked:
                with tarfile.open(handle.name, "r:gz") as archive:
                    archive.extractall(unpacked, filter="data")
                if own_diffusers_folder:
                    check_diffusers_loads(model, unpacked, False, destination, export_format="tar")
                check_loads(model, unpacked, "tar", destination)
    return names


def text_to_image_class(model):
    """diffusers' text-to-image pipeline class of ``model``'s family (``StableDiffusionPipeline`` for SD-1.x)."""
    family = families.family_of(model)
    return family.pipeline_class(family.pipelines[(TXT2IMG, False)])


def export_diffusers(model, destination: str) -> None:
    encoder = model.text_encoder
    if type(encoder).__name__ == "BertModel":
        encoder.config.use_attention_mask = True  # diffusers then passes the mask, as our predict does
    wukong = isinstance(encoder, te.WukongTextEncoder)
    tokenizer = copy.deepcopy(model.tokenizer)
    tokenizer.model_max_length = model.text_max_length  # diffusers tokenises to it; our predict to text_max_length
    family = families.family_of(model)
    pipe = text_to_image_class(model)(**{**family.pipeline_components(model, family.scheduler(model)),
                                         "text_encoder": encoder, "tokenizer": tokenizer})
    with atomic_folder(destination) as folder:
        pipe.save_pretrained(folder, safe_serialization=True)
        legacy_text_encoder_weights(type(encoder).__name__, os.path.join(folder, "text_encoder"))
        atomic_write_text(os.path.join(folder, "tokenizer", "vocab.txt"), te.vocab_lines(model.tokenizer))
        index_path = os.path.join(folder, "model_index.json")
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        if wukong:  # not a transformers class: its code goes with it, for diffusers' trust_remote_code
            atomic_copy(wukong_code.__file__, os.path.join(folder, "text_encoder", WUKONG_MODULE + ".py"))
            index["text_encoder"] = [WUKONG_MODULE, te.WUKONG]
        if model.esrgan_path:
            atomic_copy(model.esrgan_path, os.path.join(folder, ESRGAN_NAME))
            index[DIFFUSERS_ESRGAN_ORDER] = model.extra.get("esrgan_channel_order", "rgb")
        atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
        check_diffusers_loads(model, folder, wukong, destination)
        check_loads(model, folder, "diffusers", destination)


def export_family_folder(model, destination: str) -> None:
    """A model whose family's own format is a diffusers folder (Z-Image, Qwen-Image): the family's ``save``, loaded
    back by the family's diffusers pipeline and by this toolkit."""
    with atomic_folder(destination) as folder:
        families.save(model, folder)
        check_diffusers_loads(model, folder, False, destination)
        check_loads(model, folder, "diffusers", destination)


def export_lora(model, specs, lora_format: str, destination: str) -> None:
    """The LoRA ``specs`` (one file or run folder of any layout diffusers' loader of the family reads, its scale
    applied) as one ``.safetensors`` file in ``lora_format``'s key layout (``comfyui``:
    ``modelzoo.formats.comfyui_lora``), written atomically once diffusers' loader reads it back to the same weight
    changes of ``model``'s modules."""
    from safetensors.torch import save

    family = families.family_of(model)
    if lora_format not in family.lora_export_formats:
        raise UserError(f"lora_format={lora_format} is not available for {family.name} models")
    if len(specs) != 1:
        raise UserError(f"lora_format={lora_format}: give lora= one LoRA file or run folder to convert (it has "
                        f"{len(specs)})")
    spec = specs[0]
    path = os.path.join(spec.path, LORA_FILE) if os.path.isdir(spec.path) else spec.path
    tensors, config = _read_lora(model, path, spec.path)
    try:
        converted = diffusers_to_comfyui(tensors, config, spec.scale)
    except ValueError as err:
        raise UserError(f"lora_format={lora_format}: {spec.path}: {err}") from None
    with atomic_open(destination, "wb") as handle:
        handle.write(save(converted, metadata={"format": "pt"}))
        handle.flush()
        check_lora_loads(model, module_deltas(tensors, config, spec.scale), handle.name, lora_format, destination)


def _read_lora(model, path: str, given: str) -> tuple[dict[str, torch.Tensor], dict]:
    """A LoRA file as the family's diffusers loader converts it (``transformer.<module>.lora_A/lora_B``) and its
    transformer adapter's config."""
    try:
        with _quiet_diffusers():
            tensors, metadata = text_to_image_class(model).lora_state_dict(path, return_lora_metadata=True)
    except (ValueError, KeyError, RuntimeError, OSError) as err:
        raise UserError(f"lora: {given}: cannot read it as a LoRA for this model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0][:300]})") from None
    return tensors, transformer_config(metadata)


def legacy_text_encoder_weights(class_name: str, folder: str) -> None:
    """Rename the saved text encoder's weights (``model.safetensors`` or its shards and index) in ``folder`` to the
    names transformers 4.x reads, which the current release maps back on load."""
    from safetensors import safe_open
    from safetensors.torch import save

    prefix = LEGACY_TEXT_ENCODER_PREFIX.get(class_name)
    if prefix is None:  # BertModel's names are the same in 4.x and 5.x
        return
    legacy = lambda key: key if key.startswith(prefix) else prefix + key  # noqa: E731
    for path in find_weights(folder):
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
            state = {legacy(key): handle.get_tensor(key) for key in handle.keys()}
        atomic_write_bytes(path, save(state, metadata=metadata))
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        index["weight_map"] = {legacy(key): shard for key, shard in index["weight_map"].items()}
        atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_easynlp(model, destination: str) -> None:
    try:
        with atomic_folder(destination) as folder:
            families.save(model, folder, format=EASYNLP_FORMAT)
            check_loads(model, folder, "easynlp", destination)
    except NotExpressible as err:
        raise UserError(f"export_format=easynlp: {err}") from None


# ------------------------------------------------------------------------------------ post-export verification
PROBE_PROMPT = "一个红色的圆形 on a blue background"  # encoded by the model and by what loads the export: the same


def _quiet_diffusers():
    """diffusers' loading progress bar and its "expected types for text_encoder" line say nothing to our users."""
    from diffusers.utils import logging as diffusers_logging

    @contextlib.contextmanager
    def quiet():
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
        try:
            yield
        finally:
            diffusers_logging.enable_progress_bar()
            diffusers_logging.set_verbosity(verbosity)

    return quiet()


def different_weights(expected: dict[str, torch.nn.Module], loaded: dict[str, torch.nn.Module]) -> str | None:
    """The first weight (``component.name``) that is missing or differs between the two sets of modules."""
    for name, module in expected.items():
        ours = {k: v for k, v in module.state_dict().items() if not k.endswith("position_ids")}
        theirs = {k: v for k, v in loaded[name].state_dict().items() if not k.endswith("position_ids")}
        if set(ours) != set(theirs):
            return f"{name}: weight names differ ({sorted(set(ours) ^ set(theirs))[:2]})"
        for key, value in ours.items():
            other = theirs[key]
            if other.shape != value.shape or not torch.equal(other.detach().cpu().to(value.dtype), value.cpu()):
                return f"{name}.{key} differs"
    return None


def _fail(export_format: str, destination: str, problem: str) -> None:
    raise UserError(f"export_format={export_format}: the export does not load as it should ({problem}); nothing "
                    f"was written to {destination}")


def noise_schedule(model) -> tuple[str, list[float]]:
    """The sampling scheduler of ``model``'s family and its schedule (ᾱ of a DDPM-style schedule, else its sigmas)."""
    scheduler = families.family_of(model).scheduler(model)
    values = getattr(scheduler, "alphas_cumprod", None)
    return type(scheduler).__name__, (values if values is not None else scheduler.sigmas).tolist()


def compared_components(model) -> tuple[str, ...]:
    """The parts whose weights an export must hold as the model does."""
    return ("text_encoder", families.family_of(model).denoiser, "vae")


def probe_tokens(model) -> list[list[int]]:
    """``PROBE_PROMPT``'s token ids as the model tokenises it (its own ``tokenize``, else its tokenizer's)."""
    if hasattr(model, "tokenize"):
        return model.tokenize([PROBE_PROMPT]).tolist()
    return model.tokenizer([PROBE_PROMPT])["input_ids"]


def check_loads(model, folder: str, export_format: str, destination: str) -> None:
    """This toolkit's loader reads ``folder`` back as ``model``: the same weights, tokenisation, text length, native
    size, family, noise schedule and super-resolution net. Raises ``UserError`` (the export is then discarded) if
    not."""
    try:
        loaded = families.load(folder)
    except (ModelFormatError, ValueError) as err:
        _fail(export_format, destination, f"this toolkit cannot read it: {err}")
    components = compared_components(model)
    problem = different_weights({name: getattr(model, name) for name in components},
                                {name: getattr(loaded, name) for name in components})
    checks = {"tokenisation": (probe_tokens(model), probe_tokens(loaded)),
              "text length": (model.text_max_length, loaded.text_max_length),
              "native size": (model.image_size, loaded.image_size),
              "family": (model.family, loaded.family),
              "noise schedule": (noise_schedule(model), noise_schedule(loaded)),
              "ESRGAN net and channel order": tuple(m.esrgan_path and m.extra.get("esrgan_channel_order", "rgb")
                                                    for m in (model, loaded))}
    problem = problem or next((f"{what} differs" for what, (a, b) in checks.items() if a != b), None)
    if problem:
        _fail(export_format, destination, f"read back by this toolkit: {problem}")


def check_diffusers_loads(model, folder: str, remote_code: bool, destination: str,
                          export_format: str = "diffusers") -> None:
    """diffusers' text-to-image pipeline of the family (``StableDiffusionPipeline`` for SD-1.x) loads ``folder``
    (with ``trust_remote_code`` when the text encoder's code travels with it) into the same weights and encodes a
    prompt as ``model`` does (a family whose pipeline encodes prompts itself: tokenises it the same).
    ``export_format`` names the export in the error (``tar``: the folder unpacked from the package)."""
    loader = f"{text_to_image_class(model).__name__}.from_pretrained"
    try:
        with _quiet_diffusers():
            pipe = text_to_image_class(model).from_pretrained(folder, trust_remote_code=remote_code)
    except Exception as err:  # whatever diffusers or transformers raise: the folder does not load
        _fail(export_format, destination, f"{loader}: {type(err).__name__}: {err}")
    components = compared_components(model)
    problem = different_weights({name: getattr(model, name) for name in components},
                                {name: getattr(pipe, name) for name in components})
    if problem is None and not hasattr(model, "encode_prompts"):
        if pipe.tokenizer([PROBE_PROMPT])["input_ids"] != probe_tokens(model):
            problem = "it tokenises a prompt differently"
    elif problem is None:
        device = model.text_encoder.device  # the same device (and kernels) as the model's encoding
        try:
            with torch.no_grad():
                pipe.text_encoder.to(device)
                theirs = pipe.encode_prompt(PROBE_PROMPT, device, 1, False)[0].cpu()
                ours = model.encode_prompts([PROBE_PROMPT]).cpu()
        except Exception as err:  # e.g. more tokens than the text encoder has positions
            problem = f"its encode_prompt fails: {type(err).__name__}: {err}"
        else:
            if theirs.shape != ours.shape or float((theirs.float() - ours.float()).abs().max()) > 1e-4:
                problem = "it encodes a prompt differently"
    if problem:
        _fail(export_format, destination, f"{loader}: {problem}")


def check_lora_loads(model, expected: dict[str, torch.Tensor], path: str, lora_format: str,
                     destination: str) -> None:
    """diffusers' loader of ``model``'s family reads the LoRA file at ``path`` to the weight changes ``expected``
    (module → ``scale × alpha / rank × B @ A``), each of a module ``model``'s transformer has."""
    loader = f"{text_to_image_class(model).__name__}.lora_state_dict"
    try:
        with _quiet_diffusers():
            tensors, metadata = text_to_image_class(model).lora_state_dict(path, return_lora_metadata=True)
    except Exception as err:  # whatever diffusers' converters raise: the file does not load
        problem = f"{type(err).__name__}: {err}"
    else:
        loaded = module_deltas(tensors, transformer_config(metadata))
        modules = dict(getattr(model, families.family_of(model).denoiser).named_modules())
        problem = next((f"the model has no module {name}" for name in sorted(loaded) if name not in modules), None)
        if set(loaded) != set(expected):
            problem = f"other modules ({sorted(set(loaded) ^ set(expected))[:2]})"
        problem = problem or next((f"{name}'s weight change differs" for name, delta in expected.items()
                                   if not torch.allclose(loaded[name], delta, rtol=1e-5, atol=1e-7)), None)
    if problem:
        raise UserError(f"lora_format={lora_format}: the file does not load as it should ({loader}: {problem}); "
                        f"nothing was written to {destination}")


def diffusers_note(model, folder: str) -> str:
    """What loads an exported diffusers folder, as the log says it."""
    if not isinstance(model.text_encoder, te.WukongTextEncoder):
        return f"{text_to_image_class(model).__name__}.from_pretrained({folder!r}) and this toolkit load it"
    return (f"this toolkit loads it in every mode, and diffusers' StableDiffusionPipeline.from_pretrained({folder!r}, "
            f"trust_remote_code=True) does (the text encoder is EasyNLP's Wukong transformer, not a transformers "
            f"class: its code is text_encoder/{WUKONG_MODULE}.py; without trust_remote_code diffusers refuses the "
            f"folder, and transformers alone cannot load the text encoder). diffusers' pipeline cuts a "
            f"negative_prompt to the {model.text_encoder.settings['n_repeat']} token(s) of the prompt embeddings: "
            f"pass negative_prompt_embeds there instead")


def run(flags: ParsedFlags, params: dict[str, Any]) -> int:
    if not flags.outputs:
        raise UserError("--outputs is required for --mode=export (the .tar.gz path, or a folder for "
                        "export_format=diffusers or easynlp)")
    settings = InferenceSettings.from_params(params)
    if settings.lora_format:  # the LoRA converted, the model (unchanged) read to check it against
        model = load_model(flags.checkpoint_dir, modelzoo_base_dir=flags.modelzoo_base_dir)
        export_lora(model, parse_specs(settings.lora), settings.lora_format, flags.outputs)
        logger.info("wrote %s (a LoRA in %s's key layout; checked: diffusers' loader reads it to the same weight "
                    "changes)", flags.outputs, settings.lora_format)
        return 0
    model = load_model(flags.checkpoint_dir, modelzoo_base_dir=flags.modelzoo_base_dir, lora=settings.lora)
    family = families.family_of(model)
    if settings.export_format not in family.export_formats:
        why = FORMAT_LIMITS.get(settings.export_format, "")
        raise UserError(f"export_format={settings.export_format} is not available for {family.name} models "
                        f"({why + '; ' if why else ''}they export as {', '.join(family.export_formats)})")
    if settings.export_format == "tar":
        names = export_tar(model, flags.outputs)
        logger.info("wrote %s (%s; checked: this toolkit loads it)", flags.outputs, ", ".join(names))
    elif settings.export_format == "easynlp":
        export_easynlp(model, flags.outputs)
        logger.info("wrote EasyNLP latent_diffusion folder %s (checked: this toolkit loads it)", flags.outputs)
    else:
        (export_diffusers if family.denoiser == "unet" else export_family_folder)(model, flags.outputs)
        logger.info("wrote diffusers folder %s (checked: %s)", flags.outputs, diffusers_note(model, flags.outputs))
    return 0
