"""``--mode=evaluate``: how good a model is, on the last table of ``--tables``.

* With images in the table (``--second_sequence`` column in the schema): the fixed-noise denoising loss — the number
  training reports as its validation loss.
* With a ground-truth sidecar (``truth_file``, or ``TABLE.truth.jsonl`` beside the table, as the shapes data set
  writes): prompt-following accuracy. One image per prompt (seeded like predict's first sample) is judged from its
  pixels by the shapes judge on every attribute the prompt states — colour, shape, background, size (大/小) and
  position (3×3 grid) — and each is reported separately for seen and held-out colour×shape pairs (and all prompts).

  Which attributes a prompt states comes from parsing it (``shapes_data.parse_caption``); the value it is judged
  against is the sidecar's (the parsed one where the sidecar has none), and a sidecar value that contradicts the
  prompt is an error (the sidecar does not belong to the table). Per group: ``n`` prompts; for each attribute of
  ``ATTRIBUTES`` ``<attribute>_n`` (prompts stating it), ``_correct`` and ``_acc`` (correct / its n); ``both``
  counts prompts stating colour and shape, right when both are; ``all_stated`` counts prompts stating at least one
  attribute, right when every attribute they state is.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

from appzoo.latent_diffusion.data import index_table
from appzoo.latent_diffusion.generation import GenerationSettings, Generator, image_seed
from appzoo.latent_diffusion.inputs import PAIR_SCHEMA, InputTables, input_tables, text_length
from appzoo.latent_diffusion.loading import load_for_inference
from appzoo.latent_diffusion.losses import LatentCache, fixed_noise_loss
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.files import atomic_write_bytes
from easynlp_ldm.tables import BadRowPolicy, read_table

logger = logging.getLogger("easynlp.evaluate")

# What a prompt can state, in the order the judge reports them; "both" and "all_stated" are derived.
STATED_ATTRIBUTES = ("colour", "shape", "background", "size", "position")
ATTRIBUTES = ("colour", "shape", "both", "background", "size", "position", "all_stated")


def truth_path_for(table: str, given: str) -> str | None:
    if given:
        if not os.path.isfile(given):
            raise UserError(f"truth_file={given}: not found")
        return given
    candidate = os.path.splitext(table)[0] + ".truth.jsonl"
    return candidate if os.path.isfile(candidate) else None


def load_truth_by_idx(path: str) -> dict[str, dict]:
    truth = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                truth[str(record["idx"])] = record
            except (ValueError, KeyError):
                raise UserError(f"{path}, line {number}: not a JSON object with an idx") from None
    return truth


def stated_attributes(prompt: str, record: dict, where: str) -> dict[str, str]:
    """{attribute: expected value} for every attribute ``prompt`` states; the value is the truth record's (the
    prompt's own where the record lacks it). A record value that contradicts the prompt is a UserError."""
    from shapes_data import parse_caption

    stated = {}
    for attribute, said in parse_caption(prompt).items():
        if said is None:
            continue
        truth = record.get(attribute)
        if truth is not None and truth != said:
            raise UserError(f"{where}: the prompt {prompt!r} says {attribute} {said} but the ground truth says "
                            f"{truth}: the truth sidecar does not belong to this table")
        stated[attribute] = said if truth is None else truth
    return stated


def judge_prompt(verdict, stated: dict[str, str]) -> dict[str, bool | None]:
    """Right/wrong per attribute of ATTRIBUTES (None: not stated, not counted) for one judged image."""
    ok: dict[str, bool | None] = {a: (getattr(verdict, a) == stated[a] if a in stated else None)
                                  for a in STATED_ATTRIBUTES}
    ok["both"] = (ok["colour"] and ok["shape"]) if "colour" in stated and "shape" in stated else None
    ok["all_stated"] = all(ok[a] for a in stated) if stated else None
    return ok


def prompt_following(model, inputs: InputTables, truth: dict[str, dict], settings: GenerationSettings,
                     random_seed: int, batch_size: int, text_length: int, policy: BadRowPolicy,
                     max_rows: int = 0) -> dict:
    from shapes_data import AccuracyCounter, judge

    table, prompt_column = inputs.table, inputs.text_column
    generate = Generator(model, dataclasses.replace(settings, do_sr=False), text_length)
    counter = AccuracyCounter(ATTRIBUTES, per_attribute_n=True)
    batch = []

    def flush():
        images = generate([str(r[prompt_column]) for r in batch],
                          [image_seed(random_seed, r.line_number, 0) for r in batch])
        for row, image in zip(batch, images):
            idx = str(row.values.get("idx", row.line_number))
            record = truth.get(idx)
            if record is None:
                raise UserError(f"{table}, line {row.line_number}: idx {idx} has no ground truth in the sidecar")
            stated = stated_attributes(str(row[prompt_column]), record, f"{table}, line {row.line_number}")
            ok = judge_prompt(judge(image), stated)
            group = "heldout" if record.get("heldout") else "seen"
            for key in (group, "all"):
                counter.add(key, **ok)
        batch.clear()

    seen_rows = 0
    for row in read_table(table, inputs.schema, skip_first_line=inputs.skip_first_line, policy=policy):
        batch.append(row)
        seen_rows += 1
        if len(batch) == batch_size:
            flush()
        if max_rows and seen_rows >= max_rows:
            break
    if batch:
        flush()
    return counter.summary()


def accuracy_line(acc: dict) -> str:
    """One group's accuracies for the log: every attribute, with its n where it is not every prompt."""
    parts = []
    for attribute in ATTRIBUTES:
        label = "all stated attributes" if attribute == "all_stated" else attribute
        n = acc[f"{attribute}_n"]
        if not n:
            parts.append(f"{label} not stated")
        elif n == acc["n"]:
            parts.append(f"{label} {100 * acc[f'{attribute}_acc']:.1f}%")
        else:
            parts.append(f"{label} {100 * acc[f'{attribute}_acc']:.1f}% of {n}")
    return ", ".join(parts)


def run(flags: ParsedFlags, params: dict[str, Any]) -> int:
    inputs = input_tables(flags, "evaluate", default_schema=PAIR_SCHEMA)
    table = inputs.table
    truth_path = truth_path_for(table, params["truth_file"])
    if inputs.image_column is None and not truth_path:
        raise UserError(f"{table}: nothing to evaluate: the schema has no image column "
                        f"({flags.second_sequence or 'imgbase64'}) for the denoising loss and there is no ground-truth "
                        f"sidecar ({os.path.splitext(table)[0]}.truth.jsonl, or truth_file=...) for prompt-following "
                        f"accuracy")
    model = load_for_inference(flags, params)
    # Sampling settings that cannot apply (e.g. ddim_eta with PLMS) fail here, not after the denoising loss.
    settings = GenerationSettings.from_params(params).for_model(model) if truth_path else None
    length = text_length(model, flags)
    policy = BadRowPolicy(skip=params["skip_bad_rows"])
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
        metrics["steps"] = params["ddim_steps"]
        metrics["accuracy"] = prompt_following(model, inputs, load_truth_by_idx(truth_path), settings,
                                               flags.random_seed, flags.micro_batch_size, length, policy)
    if policy.total:
        metrics["bad_rows"] = dict(policy.counts)
    print(json.dumps(metrics, ensure_ascii=False), flush=True)
    if flags.outputs:
        atomic_write_bytes(flags.outputs, json.dumps(metrics, ensure_ascii=False, indent=2).encode("utf-8"))
    for group, acc in metrics.get("accuracy", {}).items():
        logger.info("%s (%d prompts): %s", group, acc["n"], accuracy_line(acc))
    if "val_loss" in metrics:
        logger.info("denoising loss on %d rows of %s: %.5f", metrics["rows"], table, metrics["val_loss"])
    return 0
