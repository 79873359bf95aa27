"""``--mode=evaluate``: the fixed-noise denoising loss of a model on a table with images (the same number training
reports as its validation loss)."""

from __future__ import annotations

import json
import logging

from easynlp_ldm.errors import UserError
from easynlp_ldm.tables import BadRowPolicy, atomic_write_bytes, parse_schema, split_tables

logger = logging.getLogger("easynlp.evaluate")


def run_evaluate(app) -> int:
    from appzoo.latent_diffusion.app import load_inference_model
    from appzoo.latent_diffusion.data import index_table
    from appzoo.latent_diffusion.train import LatentCache, fixed_noise_loss

    flags, params = app.flags, app.params
    tables = split_tables(flags.tables)
    if not tables:
        raise UserError("--tables is required for --mode=evaluate (a TSV with captions and images)")
    schema = parse_schema(flags.input_schema or "idx:str:1,text:str:1,imgbase64:str:1")
    model = load_inference_model(flags.checkpoint_dir, flags)
    text_length = model.clamp_text_length(flags.sequence_length if "sequence_length" in flags.given else None)
    policy = BadRowPolicy(skip=params["skip_bad_rows"])
    cache = LatentCache(model, model.image_size)
    table = index_table(tables[-1], schema, flags.first_sequence or "text", flags.second_sequence or "imgbase64",
                        skip_first_line=flags.skip_first_line, policy=policy, on_image=cache.add)
    if not len(table):
        raise UserError(f"{tables[-1]}: no usable rows to evaluate")
    metrics = {"rows": len(table), "val_loss": fixed_noise_loss(model, table.captions, cache.moments(), text_length)}
    if policy.total:
        metrics["bad_rows"] = dict(policy.counts)
    print(json.dumps(metrics, ensure_ascii=False), flush=True)
    if flags.outputs:
        atomic_write_bytes(flags.outputs, json.dumps(metrics, ensure_ascii=False, indent=2).encode("utf-8"))
    logger.info("evaluated %d rows of %s: validation loss %.5f", len(table), tables[-1], metrics["val_loss"])
    return 0
