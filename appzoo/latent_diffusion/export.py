"""``--mode=export``: package a model for deployment.

* ``export_format=tar`` (default): a ``.tar.gz`` holding exactly the deployable files at its top level —
  ``config.json``, ``pytorch_model.bin``, ``vocab.txt`` and ``RRDB_ESRGAN_x4.pth`` when the model has one (what
  EasyNLP's ``tar czf finetuned_model.tar.gz config.json pytorch_model.bin RRDB_ESRGAN_x4.pth vocab.txt`` made).
  ``--mode=serve --checkpoint_dir=PACKAGE.tar.gz`` serves it.
* ``export_format=diffusers``: a folder ``StableDiffusionPipeline.from_pretrained`` loads, generating the same images
  as predict for the same seed (``tokenizer/`` also carries ``vocab.txt``, as PAI's folders do). A
  ``CLIPTextModel`` text encoder is written under the weight names transformers 4.x uses (``text_model.…``), which
  the current transformers still maps on load, so both load the same weights (``legacy_text_encoder_weights``).
* ``export_format=easynlp``: a folder in EasyNLP's own latent_diffusion format (CompVis ``config.json``,
  ``pytorch_model.bin``, ``vocab.txt``, ``RRDB_ESRGAN_x4.pth``) that EasyNLP's ``LatentDiffusion`` loads; only for
  models conditioned by EasyNLP's Wukong text encoder (``modelzoo.formats.easynlp``).
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import tempfile
from typing import Any

from appzoo.latent_diffusion.generation import StableDiffusionPipeline
from appzoo.latent_diffusion.loading import load_model
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.files import atomic_copy, atomic_folder, atomic_open, atomic_write_bytes, atomic_write_text
from modelzoo import text_encoder as te
from modelzoo.formats.easynlp import FORMAT as EASYNLP_FORMAT
from modelzoo.formats.easynlp import NotExpressible
from modelzoo.ldm import CHECKPOINT_FILES, ESRGAN_NAME
from modelzoo.samplers import make_scheduler
from modelzoo.weights import find_weights

logger = logging.getLogger("easynlp.export")

# transformers 5 dropped the ``text_model`` wrapper module inside CLIPTextModel and saves its weights without the
# prefix; transformers 4.x only reads the prefixed names (unprefixed ones load as random weights, with no error),
# and 5.x renames the prefixed ones on load (its conversion_mapping: PrefixChange(prefix_to_remove="text_model")).
LEGACY_TEXT_ENCODER_PREFIX = {"CLIPTextModel": "text_model."}


def export_tar(model, destination: str) -> list[str]:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        names = list(CHECKPOINT_FILES) + ([ESRGAN_NAME] if model.esrgan_path else [])
        with atomic_open(destination, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as archive:
            for name in names:
                archive.add(os.path.join(folder, name), arcname=name)
    return names


def export_diffusers(model, destination: str) -> None:
    encoder = model.text_encoder
    if type(encoder).__name__ == "BertModel":
        encoder.config.use_attention_mask = True  # diffusers then passes the mask, as our predict does
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=encoder, tokenizer=model.tokenizer, unet=model.unet,
                                   scheduler=make_scheduler("", model.scheduler_config, model.scheduler_class),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with atomic_folder(destination) as folder:
        pipe.save_pretrained(folder, safe_serialization=True)
        legacy_text_encoder_weights(type(encoder).__name__, os.path.join(folder, "text_encoder"))
        atomic_write_text(os.path.join(folder, "tokenizer", "vocab.txt"), te.vocab_lines(model.tokenizer))
        if model.esrgan_path:
            atomic_copy(model.esrgan_path, os.path.join(folder, ESRGAN_NAME))


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
            model.save_pretrained(folder, format=EASYNLP_FORMAT)
    except NotExpressible as err:
        raise UserError(f"export_format=easynlp: {err}") from None


def run(flags: ParsedFlags, params: dict[str, Any]) -> int:
    if not flags.outputs:
        raise UserError("--outputs is required for --mode=export (the .tar.gz path, or a folder for "
                        "export_format=diffusers or easynlp)")
    model = load_model(flags.checkpoint_dir, modelzoo_base_dir=flags.modelzoo_base_dir, lora=params["lora"])
    if params["export_format"] == "tar":
        names = export_tar(model, flags.outputs)
        logger.info("wrote %s (%s)", flags.outputs, ", ".join(names))
    elif params["export_format"] == "easynlp":
        export_easynlp(model, flags.outputs)
        logger.info("wrote EasyNLP latent_diffusion folder %s", flags.outputs)
    else:
        export_diffusers(model, flags.outputs)
        logger.info("wrote diffusers folder %s (StableDiffusionPipeline.from_pretrained loads it)", flags.outputs)
    return 0
