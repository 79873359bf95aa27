"""``--mode=export``: package a model for deployment.

* ``export_format=tar`` (default): a ``.tar.gz`` holding exactly the deployable files at its top level —
  ``config.json``, ``pytorch_model.bin``, ``vocab.txt`` and ``RRDB_ESRGAN_x4.pth`` when the model has one (what
  EasyNLP's ``tar czf finetuned_model.tar.gz config.json pytorch_model.bin RRDB_ESRGAN_x4.pth vocab.txt`` made).
  ``--mode=serve --checkpoint_dir=PACKAGE.tar.gz`` serves it.
* ``export_format=diffusers``: a folder ``StableDiffusionPipeline.from_pretrained`` loads, generating the same images
  as predict for the same seed (``tokenizer/`` also carries ``vocab.txt``, as PAI's folders do).
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile

from easynlp_ldm.errors import UserError
from modelzoo.ldm import CHECKPOINT_FILES, ESRGAN_NAME

logger = logging.getLogger("easynlp.export")


def export_tar(model, destination: str) -> list[str]:
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        names = list(CHECKPOINT_FILES) + ([ESRGAN_NAME] if model.esrgan_path else [])
        tmp = f"{destination}.tmp.{os.getpid()}"
        try:
            with tarfile.open(tmp, "w:gz") as archive:
                for name in names:
                    archive.add(os.path.join(folder, name), arcname=name)
            os.replace(tmp, destination)
        except OSError as err:
            raise UserError(f"{destination}: cannot write the package ({err.strerror or err})") from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return names


def export_diffusers(model, destination: str) -> None:
    from appzoo.latent_diffusion.pipeline import StableDiffusionPipeline
    from modelzoo import text_encoder as te
    from modelzoo.samplers import make_scheduler

    if os.path.exists(destination) and os.listdir(destination):
        raise UserError(f"{destination} exists and is not empty; choose a new folder for the diffusers export")
    encoder = model.text_encoder
    if type(encoder).__name__ == "BertModel":
        encoder.config.use_attention_mask = True  # diffusers then passes the mask, as our predict does
    pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=encoder, tokenizer=model.tokenizer, unet=model.unet,
                                   scheduler=make_scheduler("", model.scheduler_config, model.scheduler_class),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(os.path.abspath(destination)) or ".")
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        with open(os.path.join(tmp, "tokenizer", "vocab.txt"), "w", encoding="utf-8") as handle:
            handle.write(te.vocab_lines(model.tokenizer))
        if model.esrgan_path:
            shutil.copyfile(model.esrgan_path, os.path.join(tmp, ESRGAN_NAME))
        if os.path.isdir(destination):
            os.rmdir(destination)
        os.replace(tmp, destination)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{destination}: cannot write the export ({err.strerror or err})") from None


def run_export(app) -> int:
    from appzoo.latent_diffusion.app import load_inference_model

    flags, params = app.flags, app.params
    if not flags.outputs:
        raise UserError("--outputs is required for --mode=export (the .tar.gz path, or a folder for "
                        "export_format=diffusers)")
    model = load_inference_model(flags.checkpoint_dir, flags)
    if params["export_format"] == "tar":
        names = export_tar(model, flags.outputs)
        logger.info("wrote %s (%s)", flags.outputs, ", ".join(names))
    else:
        export_diffusers(model, flags.outputs)
        logger.info("wrote diffusers folder %s (StableDiffusionPipeline.from_pretrained loads it)", flags.outputs)
    return 0
