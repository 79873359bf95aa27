"""``--mode=evaluate``: how good a model is, on the last table of ``--tables``.

* With images in the table (``--second_sequence`` column in the schema): the fixed-noise denoising loss — the number
  training reports as its validation loss.
* With a ground-truth sidecar (``truth_file``, or ``TABLE.truth.jsonl`` beside the table, as the shapes data set
  writes): prompt-following accuracy. One image per prompt (seeded like predict's first sample) is judged from its
  pixels by the shapes judge on every attribute the prompt states — colour, shape, background, size (大/小) and
  position (3×3 grid) — and each is reported separately for seen and held-out colour×shape pairs (and all prompts).
  The scoring (stated attributes, the judge's verdicts, the metrics' keys) is the data set's:
  :mod:`shapes_data.scoring`; this mode supplies the images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from appzoo.latent_diffusion.data import LatentCache, index_table
from appzoo.latent_diffusion.generation import Generator, image_seed
from appzoo.latent_diffusion.inputs import PAIR_SCHEMA, InputTables, input_tables, text_length
from appzoo.latent_diffusion.loading import load_for_inference
from appzoo.latent_diffusion.settings import GenerationSettings, InferenceSettings
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.files import atomic_write_bytes
from easynlp_ldm.tables import BadRowPolicy, read_table
from modelzoo.objectives import fixed_noise_loss
from shapes_data import scoring

logger = logging.getLogger("easynlp.evaluate")


def prompt_following(model, inputs: InputTables, truth: dict[str, dict], settings: GenerationSettings,
                     random_seed: int, batch_size: int, text_length: int, policy: BadRowPolicy,
                     max_rows: int = 0) -> dict:
    """Shapes prompt-following accuracy (:func:`shapes_data.scoring.prompt_following`) of ``model``: one image per
    prompt, seeded like predict's first sample of its row, without super-resolution."""
    generator = Generator(model, dataclasses.replace(settings, do_sr=False), text_length)

    def generate(prompts: list[str], line_numbers: list[int]):
        return generator(prompts, [image_seed(random_seed, number, 0) for number in line_numbers])

    rows = read_table(inputs.table, inputs.schema, skip_first_line=inputs.skip_first_line, policy=policy)
    return scoring.prompt_following(rows, generate, truth, inputs.table, inputs.text_column, batch_size, max_rows)


def run(flags: ParsedFlags, params: dict[str, Any]) -> int:
    inference = InferenceSettings.from_params(params)
    inputs = input_tables(flags, "evaluate", default_schema=PAIR_SCHEMA)
    table = inputs.table
    truth_path = scoring.truth_path_for(table, inference.truth_file)
    if inputs.image_column is None and not truth_path:
        raise UserError(f"{table}: nothing to evaluate: the schema has no image column "
                        f"({flags.second_sequence or 'imgbase64'}) for the denoising loss and there is no ground-truth "
                        f"sidecar ({os.path.splitext(table)[0]}.truth.jsonl, or truth_file=...) for prompt-following "
                        f"accuracy")
    model = load_for_inference(flags, inference)
    # Sampling settings that cannot apply (e.g. ddim_eta with PLMS) fail here, not after the denoising loss.
    settings = inference.generation().for_model(model) if truth_path else None
    length = text_length(model, flags)
    policy = BadRowPolicy(skip=inference.skip_bad_rows)
    metrics: dict = {"table": table}
    if inputs.image_column is not None:
        cache = LatentCache(model, model.image_size)
        indexed = index_table(table, inputs, policy, on_image=cache.add)
        if not len(indexed):
            raise UserError(f"{table}: no usable rows to evaluate")
        metrics["rows"] = len(indexed)
        metrics["val_loss"] = fixed_noise_loss(model, indexed.captions, cache.moments(), length)
    if truth_path:
        metrics["truth_file"] = truth_path
        metrics["steps"] = settings.steps
        metrics["accuracy"] = prompt_following(model, inputs, scoring.load_truth_by_idx(truth_path), settings,
                                               flags.random_seed, flags.micro_batch_size, length, policy)
    if policy.total:
        metrics["bad_rows"] = dict(policy.counts)
    print(json.dumps(metrics, ensure_ascii=False), flush=True)
    if flags.outputs:
        atomic_write_bytes(flags.outputs, json.dumps(metrics, ensure_ascii=False, indent=2).encode("utf-8"))
    for group, acc in metrics.get("accuracy", {}).items():
        logger.info("%s (%d prompts): %s", group, acc["n"], scoring.accuracy_line(acc))
    if "val_loss" in metrics:
        logger.info("denoising loss on %d rows of %s: %.5f", metrics["rows"], table, metrics["val_loss"])
    return 0
