"""``--mode=evaluate``: how good a model is, on the last table of ``--tables``.

* With images in the table (``--second_sequence`` column in the schema): the fixed-noise denoising loss — the number
  training reports as its validation loss.
* Image metrics, each where its parameter is given, of one image per prompt (seeded like predict's first sample,
  without super-resolution): ``clip_model=`` the CLIP score and ``preference_model=`` a preference score (per image
  and their mean), ``fid_weights=`` FID and KID against the table's images or ``fid_reference=`` (a folder). The
  metrics are :mod:`modelzoo.image_metrics`'; this mode supplies the images.
* With a ground-truth sidecar (``truth_file``, or ``TABLE.truth.jsonl`` beside the table, as the shapes data set
  writes): prompt-following accuracy. Each image is judged from its pixels by the shapes judge on every attribute
  the prompt states — colour, shape, background, size (大/小) and position (3×3 grid) — and each is reported
  separately for seen and held-out colour×shape pairs (and all prompts); each image's verdicts are its
  ``judge_<attribute>`` scores (1 right, 0 wrong, empty where the prompt does not state it). The scoring (stated
  attributes, the judge's verdicts, the metrics' keys) is the data set's: :mod:`shapes_data.scoring`.
* ``evaluate_output=DIR``: the images (``DIR/images/<model>/<idx>.png``), the per-image scores, an HTML report and
  the summary (:mod:`appzoo.latent_diffusion.report`).
* Two models (``--checkpoint_dir=A,B`` or ``compare_with=B``) generate from the same prompts and seeds, one after
  the other; the summary gives each model's metrics and each difference B − A with its bootstrap interval
  (:mod:`appzoo.latent_diffusion.comparison`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from typing import Any

import numpy as np

from appzoo.latent_diffusion import report
from appzoo.latent_diffusion.comparison import SET_METRIC_NOTE, compare
from appzoo.latent_diffusion.data import LatentCache, encoded_captions, index_table
from appzoo.latent_diffusion.generation import Generator, image_seed
from appzoo.latent_diffusion.inputs import PAIR_SCHEMA, InputTables, input_tables, text_length
from appzoo.latent_diffusion.loading import load_for_inference
from appzoo.latent_diffusion.report import ImageRecord, ModelEvaluation
from appzoo.latent_diffusion.settings import GenerationSettings, InferenceSettings
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.files import atomic_write_bytes
from easynlp_ldm.tables import BadRowPolicy, encode_image, read_table
from modelzoo.families import family_of
from modelzoo.objectives import fixed_noise_flow_loss, fixed_noise_loss
from shapes_data import scoring

logger = logging.getLogger("easynlp.evaluate")

REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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


# ----------------------------------------------------------------------------------------------- what is asked
def models_to_evaluate(checkpoint_dir: str, compare_with: str) -> list[str]:
    """``--checkpoint_dir`` — ``A,B`` when it holds a comma and names no existing path — then ``compare_with``."""
    models = [checkpoint_dir]
    if "," in checkpoint_dir and not os.path.exists(checkpoint_dir):
        models = [part.strip() for part in checkpoint_dir.split(",")]
    if compare_with:
        models.append(compare_with)
    if len(models) > 2:
        raise UserError(f"--checkpoint_dir / compare_with: evaluate compares two models, got {len(models)} "
                        f"({', '.join(models)})")
    if len(models) == 2 and not all(models):
        raise UserError(f"--checkpoint_dir={checkpoint_dir}: name both models to compare (A,B), or give "
                        f"compare_with=B")
    return models


def model_labels(models: list[str]) -> list[str]:
    """A short, file-safe name per model (its folder's name; the embedded default's name for an empty one),
    distinct."""
    from modelzoo.pretrained import DEFAULT_MODEL

    labels = []
    for model in models:
        label = safe_name(os.path.basename(os.path.normpath(model)) if model else DEFAULT_MODEL) or "model"
        labels.append(label if label not in labels else f"{label}-{len(labels) + 1}")
    return labels


def safe_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("._")[:100]


def check_metric_files(inference: InferenceSettings, inputs: InputTables) -> None:
    """The metric parameters name what exists, and FID has reference images: before any model is loaded."""
    for name, kind in (("clip_model", "folder"), ("preference_model", "folder"), ("preference_processor", "folder"),
                       ("fid_weights", "file"), ("fid_reference", "folder")):
        value = getattr(inference, name)
        if value and not (os.path.isdir(value) if kind == "folder" else os.path.isfile(value)):
            raise UserError(f"{name}={value}: no such {kind}; give a local {kind} (nothing is downloaded)")
    if inference.fid_weights and not inference.fid_reference and inputs.image_column is None:
        raise UserError(f"fid_weights={inference.fid_weights}: no reference images for FID/KID: the table has no "
                        f"image column; give fid_reference=FOLDER of images, or a table with images")
    if inference.fid_reference and not inference.fid_weights:
        logger.warning("fid_reference=%s has no effect without fid_weights=", inference.fid_reference)


# ----------------------------------------------------------------------------------------------- the metrics
class ImageMetrics:
    """The metrics asked for (``clip_model``, ``preference_model``, ``fid_weights``), each loaded once for every
    model: ``scores(images, prompts)`` gives the per-image scores by name, ``inception(images)`` the FID features
    (None without fid_weights)."""

    def __init__(self, inference: InferenceSettings):
        self.scorers = {}
        self.inception = None
        if not (inference.clip_model or inference.preference_model or inference.fid_weights):
            return
        from easynlp_ldm.distributed import model_device
        from modelzoo.image_metrics import ClipScorer, InceptionFeatures, PreferenceScorer

        device = model_device()
        if inference.clip_model:
            self.scorers["clip_score"] = ClipScorer(inference.clip_model, device=device)
        if inference.preference_model:
            self.scorers["preference_score"] = PreferenceScorer(
                inference.preference_model, processor=inference.preference_processor or None, device=device)
        if inference.fid_weights:
            self.inception = InceptionFeatures(inference.fid_weights, device=device)

    def scores(self, images: list, prompts: list[str]) -> dict[str, list[float]]:
        return {name: [float(s) for s in scorer(images, prompts)] for name, scorer in self.scorers.items()}

    def reference_features(self, inference: InferenceSettings, inputs: InputTables, batch_size: int) -> np.ndarray:
        """Inception features of the reference images: ``fid_reference``'s files, else the table's image column."""
        from PIL import Image

        if inference.fid_reference:
            paths = sorted(os.path.join(inference.fid_reference, name) for name in os.listdir(inference.fid_reference)
                           if name.lower().endswith(REFERENCE_SUFFIXES))
            images = (Image.open(path).convert("RGB") for path in paths)
            where = f"fid_reference={inference.fid_reference}"
        else:
            rows = read_table(inputs.table, inputs.schema, skip_first_line=inputs.skip_first_line,
                              policy=BadRowPolicy(skip=True), image_columns=[inputs.image_column])
            images = (row[inputs.image_column] for row in rows)
            where = f"{inputs.table} (column {inputs.image_column})"
        features = [self.inception(batch) for batch in batches(images, batch_size)]
        count = sum(len(f) for f in features)
        if count < 2:
            raise UserError(f"{where}: {count} reference image(s) for FID/KID; at least 2 are needed "
                            f"({', '.join(REFERENCE_SUFFIXES)} files in fid_reference=, or a table with images)")
        return np.concatenate(features)


def batches(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def set_metrics(reference: np.ndarray, generated: np.ndarray) -> dict[str, float]:
    """FID and KID (mean and std over subsets, at most as large as the smaller set) of the generated images."""
    from modelzoo.image_metrics import fid, kid

    kid_mean, kid_std = kid(reference, generated)
    return {"fid": float(fid(reference, generated)), "kid": float(kid_mean), "kid_std": float(kid_std)}


# ----------------------------------------------------------------------------------------------- one model
def denoising_loss(model, captions: list[str], moments, length: int) -> float:
    """The validation loss training reports for the model's family: the flow-matching DiTs' (captions encoded as
    their training caches them) or SD-1.x's."""
    if family_of(model).caches_text_embeddings:
        return fixed_noise_flow_loss(model, encoded_captions(model, captions, length), moments)
    return fixed_noise_loss(model, captions, moments, length)


def mean_scores(records: list[ImageRecord], names) -> dict[str, float]:
    means = {}
    for name in names:
        values = [r.scores[name] for r in records if name in r.scores and math.isfinite(r.scores[name])]
        means[name] = float(np.mean(values)) if values else None
    return means


def evaluate_model(flags: ParsedFlags, inference: InferenceSettings, inputs: InputTables, checkpoint: str,
                   label: str, generating: bool, truth_path: str | None, metrics_of: ImageMetrics,
                   reference: np.ndarray | None) -> ModelEvaluation:
    model = load_for_inference(flags, inference, checkpoint)
    table = inputs.table
    # Sampling settings that cannot apply (e.g. ddim_eta with PLMS) fail here, not after the denoising loss.
    settings = inference.generation().for_model(model) if generating else None
    length = text_length(model, flags)
    policy = BadRowPolicy(skip=inference.skip_bad_rows)
    metrics: dict[str, Any] = {}
    if inputs.image_column is not None:
        cache = LatentCache(model, model.image_size)
        indexed = index_table(table, inputs, policy, on_image=cache.add)
        if not len(indexed):
            raise UserError(f"{table}: no usable rows to evaluate")
        metrics["rows"] = len(indexed)
        metrics["val_loss"] = denoising_loss(model, indexed.captions, cache.moments(), length)
    records: list[ImageRecord] = []
    if generating:
        if truth_path:
            metrics["truth_file"] = truth_path
        metrics["steps"] = settings.steps
        tally = scoring.PromptFollowing(scoring.load_truth_by_idx(truth_path), table, inputs.text_column) \
            if truth_path else None
        features, taken = [], set()
        generator = Generator(model, dataclasses.replace(settings, do_sr=False), length)
        rows = read_table(table, inputs.schema, skip_first_line=inputs.skip_first_line, policy=policy)
        for batch in batches(rows, flags.micro_batch_size):
            prompts = [str(row[inputs.text_column]) for row in batch]
            seeds = [image_seed(flags.random_seed, row.line_number, 0) for row in batch]
            images = generator(prompts, seeds)
            scores = metrics_of.scores(images, prompts)
            if metrics_of.inception is not None:
                features.append(metrics_of.inception(images))
            for i, (row, image) in enumerate(zip(batch, images)):
                record = ImageRecord(str(row.values.get("idx", row.line_number)), prompts[i], seeds[i], "",
                                     {name: values[i] for name, values in scores.items()})
                if tally is not None:
                    record.scores.update({f"judge_{attribute}": math.nan if ok is None else float(ok)
                                          for attribute, ok in tally.add(row, image).items()})
                if inference.evaluate_output:
                    record.image = save_image(inference.evaluate_output, label,
                                              image_name(record.idx, row.line_number, taken), image)
                records.append(record)
        if not records:
            raise UserError(f"{table}: no usable rows to evaluate")
        if tally is not None:
            metrics["accuracy"] = tally.summary()
        if records and (metrics_of.scorers or reference is not None):
            metrics["prompts"] = len(records)
            metrics.update(mean_scores(records, metrics_of.scorers))
        if reference is not None:
            metrics.update(set_metrics(reference, np.concatenate(features)))
    if policy.total:
        metrics["bad_rows"] = dict(policy.counts)
    del model
    return ModelEvaluation(label, checkpoint, metrics, records)


def save_image(folder: str, label: str, name: str, image) -> str:
    """``image`` as ``images/<label>/<name>.png`` under ``folder``; the path relative to ``folder``."""
    relative = f"images/{label}/{name}.png"
    path = os.path.join(folder, relative)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_bytes(path, encode_image(image, "png"))
    return relative


def image_name(idx: str, line_number: int, taken: set[str]) -> str:
    """A file name for a row's image: its idx made file-safe (with its line number when that is taken or empty)."""
    name = safe_name(idx)
    name = f"{name}-{line_number}" if not name or name in taken else name
    taken.add(name)
    return name


# ----------------------------------------------------------------------------------------------- the mode
def run(flags: ParsedFlags, params: dict[str, Any]) -> int:
    inference = InferenceSettings.from_params(params)
    inputs = input_tables(flags, "evaluate", default_schema=PAIR_SCHEMA)
    table = inputs.table
    truth_path = scoring.truth_path_for(table, inference.truth_file)
    models = models_to_evaluate(flags.checkpoint_dir or "", inference.compare_with)
    generating = bool(truth_path or inference.clip_model or inference.preference_model or inference.fid_weights or
                      inference.evaluate_output or len(models) > 1)
    if inputs.image_column is None and not generating:
        raise UserError(f"{table}: nothing to evaluate: the schema has no image column "
                        f"({flags.second_sequence or 'imgbase64'}) for the denoising loss and there is no ground-truth "
                        f"sidecar ({os.path.splitext(table)[0]}.truth.jsonl, or truth_file=...) for prompt-following "
                        f"accuracy")
    check_metric_files(inference, inputs)
    metrics_of = ImageMetrics(inference)
    reference = metrics_of.reference_features(inference, inputs, flags.micro_batch_size) \
        if metrics_of.inception is not None else None
    evaluations = [evaluate_model(flags, inference, inputs, model, label, generating, truth_path, metrics_of,
                                  reference) for model, label in zip(models, model_labels(models))]
    summary = summarize(table, evaluations, inference, flags.random_seed,
                        None if reference is None else len(reference))
    print(json.dumps(summary, ensure_ascii=False), flush=True)
    if flags.outputs:
        atomic_write_bytes(flags.outputs, json.dumps(summary, ensure_ascii=False, indent=2).encode("utf-8"))
    if inference.evaluate_output:
        report.write(inference.evaluate_output, evaluations, summary)
    for evaluation in evaluations:
        log_metrics(evaluation, table, len(evaluations) > 1)
    return 0


def summarize(table: str, evaluations: list[ModelEvaluation], inference: InferenceSettings, seed: int,
              reference_images: int | None) -> dict:
    """One model: the table and its metrics (the keys as before image metrics existed, then theirs). Two: each
    model's metrics and the differences (second − first)."""
    summary: dict[str, Any] = {"table": table}
    if len(evaluations) == 1:
        summary.update(evaluations[0].metrics)
    else:
        first, second = evaluations
        summary["models"] = {e.label: {"checkpoint_dir": e.checkpoint, **e.metrics} for e in evaluations}
        set_names = ("fid", "kid")
        summary["difference"] = compare(
            first.score_columns(), second.score_columns(),
            {k: v for k, v in first.metrics.items() if k in set_names},
            {k: v for k, v in second.metrics.items() if k in set_names}, inference.bootstrap_resamples, seed)
        summary["difference_of"] = f"{second.label} - {first.label}"
        summary["bootstrap_resamples"] = inference.bootstrap_resamples
        summary["note"] = SET_METRIC_NOTE
    if reference_images is not None:
        summary["fid_reference"] = inference.fid_reference or table
        summary["fid_reference_images"] = reference_images
    if inference.evaluate_output:
        summary["evaluate_output"] = inference.evaluate_output
    return summary


def log_metrics(evaluation: ModelEvaluation, table: str, named: bool) -> None:
    metrics = evaluation.metrics
    who = f"{evaluation.label}: " if named else ""
    for group, acc in metrics.get("accuracy", {}).items():
        logger.info("%s%s (%d prompts): %s", who, group, acc["n"], scoring.accuracy_line(acc))
    if "val_loss" in metrics:
        logger.info("%sdenoising loss on %d rows of %s: %.5f", who, metrics["rows"], table, metrics["val_loss"])
    for name in ("clip_score", "preference_score", "fid", "kid"):
        if metrics.get(name) is not None:
            logger.info("%s%s %.4f", who, name, metrics[name])
