"""``--mode=predict``: a TSV of prompts → an output TSV (one row per image, in input order) and image files.

Each image has its own seed, derived from ``--random_seed``, the input row's line number and the sample number, so
the same seed gives the same image whatever the batch it was generated in. Output rows are appended and flushed per
batch; a progress record beside the output lets a rerun of the same command continue after the last complete row.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from appzoo.latent_diffusion.conditioning import ImageInputs, parse_controlnets
from appzoo.latent_diffusion.generation import Generator, image_seed
from appzoo.latent_diffusion.inputs import (
    PROMPT_SCHEMA,
    input_tables,
    output_columns,
    requested_text_length,
    text_length,
)
from appzoo.latent_diffusion.loading import load_for_inference
from appzoo.latent_diffusion.settings import (
    GENERATION_DEFAULTS,
    InferenceSettings,
    image_input_problem,
    image_strength,
    pipeline_takes_strength,
    redraw_problem,
)
from easynlp_ldm import distributed
from easynlp_ldm.aigc import derived_id
from easynlp_ldm.args import ParsedFlags
from easynlp_ldm.errors import UserError
from easynlp_ldm.files import atomic_write_bytes
from easynlp_ldm.predicting import (
    Progress,
    file_fingerprint,
    merge_parts,
    part_path,
    progress_counts,
    truncate_rows,
)
from easynlp_ldm.tables import (
    BadRow,
    BadRowPolicy,
    TsvWriter,
    decode_image_base64,
    encode_image,
    read_table,
    starts_with_header,
)
from modelzoo.ldm import LatentDiffusion

logger = logging.getLogger("easynlp.predict")


_UNSAFE = re.compile(r"[^\w.\-]+", re.UNICODE)


def safe_name(text: str, fallback: str) -> str:
    """A file-name-safe version of an idx: no separators, no leading dots, never empty, never '..'."""
    name = _UNSAFE.sub("_", str(text)).strip("._")[:120]
    return name or fallback


def contained_path(root: str, *parts: str) -> str:
    root = os.path.abspath(root)
    path = os.path.abspath(os.path.join(root, *parts))
    if os.path.commonpath([root, path]) != root:
        raise UserError(f"refusing to write outside image_prefix={root}: {path}")
    return path


@dataclass
class PredictPlan:
    table: str
    schema: list
    prompt_column: str
    output_columns: list[str]
    append_columns: list[str]
    samples_per_row: int
    image_column: str | None = None  # img2img / inpainting: the input image (imgbase64, or --second_sequence)
    mask_column: str | None = None  # inpainting: the mask (white = repaint)
    control_columns: tuple[str, ...] = ()  # ControlNet conditioning images: control, control2, … (one per ControlNet)

    def image_inputs(self, row) -> tuple:
        """The row's input images decoded (init image, mask, conditioning images); ``BadRow`` when one is not an
        image or the mask's size is not its image's."""
        def image(column):
            return decode_image_base64(row[column]) if column else None

        init, mask = image(self.image_column), image(self.mask_column)
        if mask is not None and mask.size != init.size:
            raise BadRow("mask size", f"the mask is {mask.width}×{mask.height} but its image {init.width}×"
                         f"{init.height}; give a mask of the image's size (white = repaint)")
        return init, mask, [image(column) for column in self.control_columns]


def plan_from_flags(flags: ParsedFlags, settings: InferenceSettings) -> PredictPlan:
    if not flags.outputs:
        raise UserError("--outputs is required for --mode=predict (the output TSV path)")
    inputs = input_tables(flags, "predict", default_schema=PROMPT_SCHEMA)
    generated, appended = output_columns(flags, inputs)
    names = inputs.names
    mask = "mask" if "mask" in names else None
    controls = tuple(name for name in ["control"] + [f"control{i}" for i in range(2, 9)] if name in names)
    if mask and not inputs.image_column:
        raise UserError("--input_schema has a mask column but no image column to inpaint (imgbase64, or the column "
                        "--second_sequence names)")
    wanted = len(parse_controlnets(settings.controlnet))
    if wanted != len(controls):
        raise UserError(f"controlnet= names {wanted} ControlNet(s) but --input_schema has {len(controls)} "
                        f"conditioning-image column(s) ({', '.join(controls) or 'none'}); name them control, "
                        f"control2, … one per ControlNet")
    # Before the model loads; strength × steps once it has (check_redraw: its family says whether the pipeline takes
    # strength, its folder what ddim_steps not given is).
    problem = image_input_problem(GENERATION_DEFAULTS["steps"], settings.strength, settings.guidance_rescale,
                                  image=bool(inputs.image_column), mask=bool(mask), controlnet=bool(controls),
                                  takes_strength=False)
    if problem and not problem.error:
        logger.warning("%s: name an image column in --input_schema (imgbase64) or --second_sequence", problem.message)
    elif problem:
        raise UserError(problem.message)
    if inputs.image_column or controls:
        logger.info("generating from images: %s", ", ".join(filter(None, [
            inputs.image_column and f"input images from column {inputs.image_column} (strength "
                                    f"{image_strength(settings.strength, bool(mask)):g})",
            mask and "inpainting masks from column mask (white = repaint)",
            controls and f"ControlNet conditioning images from {', '.join(controls)} (control_preprocessor="
                         f"{settings.control_preprocessor})"])))
    return PredictPlan(inputs.table, inputs.schema, inputs.text_column, generated, appended,
                       settings.n_samples * settings.n_iter, inputs.image_column, mask, controls)


def check_redraw(plan: PredictPlan, model: LatentDiffusion, steps: int, strength: float) -> None:
    """From input images, ``strength`` × ``steps`` must redraw a step (diffusers fails otherwise) where the model's
    pipeline takes a strength (the edit pipelines and ControlNet inpainting take none)."""
    mask = bool(plan.mask_column)
    if not plan.image_column or not pipeline_takes_strength(model, mask=mask, controlnet=bool(plan.control_columns)):
        return
    problem = redraw_problem(steps, strength, mask)
    if problem:
        raise UserError(f"ddim_steps={steps}, strength={strength:g}: {problem}")


def run_fingerprint(plan: PredictPlan, model: LatentDiffusion, flags, params) -> str:
    model_files = {}
    package = getattr(model, "package_path", None)  # a .tar.gz is unpacked in a new temporary folder every run
    source = package or getattr(model, "source_path", "")
    if package:
        model_files["package"] = file_fingerprint(package)
    for name in () if package else ("config.json", "pytorch_model.bin", "model_index.json"):
        if source and os.path.isfile(os.path.join(source, name)):
            model_files[name] = file_fingerprint(os.path.join(source, name))
    record = {"input": file_fingerprint(plan.table), "model": [source, model_files], "params": params,
              "seed": flags.random_seed, "schema": flags.input_schema, "output": plan.output_columns,
              "append": plan.append_columns, "prompt": plan.prompt_column, "skip_first_line": flags.skip_first_line,
              "sequence_length": requested_text_length(flags)}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


class ImageFiles:
    """``image_prefix/<idx>/0000.png …`` plus ``prompt.txt``, contained in image_prefix: one folder per row, named by
    its idx (EasyNLP numbered folders ``image_prefix + str(counter)``; see docs/generation.md "Image files")."""

    def __init__(self, prefix: str, image_format: str):
        self.prefix = prefix
        self.extension = "jpg" if image_format in ("jpeg", "jpg") else "png"
        os.makedirs(prefix, exist_ok=True)

    def folder(self, idx: str, line_number: int) -> str:
        name = safe_name(idx, f"row{line_number}")
        folder = contained_path(self.prefix, name)
        marker = os.path.join(folder, "line.txt")
        if os.path.isfile(marker):
            with open(marker, encoding="utf-8") as handle:
                if handle.read().strip() != str(line_number):  # the same idx on another row: keep both
                    folder = contained_path(self.prefix, f"{name}-line{line_number}")
        return folder

    def write(self, idx: str, line_number: int, prompt: str, sample: int, data: bytes) -> str:
        folder = self.folder(idx, line_number)
        os.makedirs(folder, exist_ok=True)
        atomic_write_bytes(os.path.join(folder, "line.txt"), f"{line_number}\n".encode())
        atomic_write_bytes(os.path.join(folder, "prompt.txt"), (prompt + "\n").encode("utf-8"))
        path = os.path.join(folder, f"{sample:04d}.{self.extension}")
        atomic_write_bytes(path, data)
        return path


def run(flags: ParsedFlags, params: dict[str, Any]) -> int:
    ctx = distributed.context()
    if not ctx.enabled:
        return predict_rows(flags, params, flags.outputs)
    # Rows are sharded by input line number; each rank writes (and can resume) its own part, rank 0 merges them.
    part = part_path(flags.outputs, ctx.rank, ctx.world_size)
    predict_rows(flags, params, part, shard=(ctx.rank, ctx.world_size))
    distributed.barrier()
    if ctx.is_main:
        count = merge_parts(flags.outputs, ctx.world_size)
        logger.info("merged %d rows from %d processes into %s", count, ctx.world_size, flags.outputs)
    distributed.barrier()
    return 0


def predict_rows(flags: ParsedFlags, params: dict[str, Any], outputs: str,
                 shard: tuple[int, int] | None = None) -> int:
    settings = InferenceSettings.from_params(params)
    plan = plan_from_flags(flags, settings)
    model = load_for_inference(flags, settings)
    generator = Generator(model, settings.generation(), text_length(model, flags))
    check_redraw(plan, model, generator.settings.steps, settings.strength)
    run_id = run_fingerprint(plan, model, flags, params)
    fingerprint = run_id + (f"/{shard[0]}of{shard[1]}" if shard else "")
    labels = settings.aigc_labels()
    progress = Progress(outputs, fingerprint)
    resuming = progress.load_resumable(outputs)
    if resuming:
        truncate_rows(outputs, progress.rows)
        logger.info("resuming %s after input line %d (%d rows already written by the same input, model and "
                    "settings)", outputs, progress.last_line, progress.rows)
    elif os.path.exists(outputs):
        logger.info("replacing %s: it was not written by this input, model and settings", outputs)
    files = ImageFiles(settings.image_prefix, settings.image_format) if settings.write_image else None
    policy = BadRowPolicy(skip=settings.skip_bad_rows)
    # The bar counts prompts (input rows); a resumed run's starts at the prompts already done, so it ends at
    # total/total and its rate and ETA count this run's work only.
    total, done = progress_counts(plan.table, flags.skip_first_line or starts_with_header(plan.table, plan.schema),
                                  progress.last_line, shard)
    writer = TsvWriter(outputs, append=resuming)
    progress.save()
    image_format = "jpeg" if settings.image_format in ("jpeg", "jpg") else "png"
    bar = tqdm(total=total, initial=done, unit="prompt", dynamic_ncols=True,
               disable=os.environ.get("EASYNLP_PROGRESS") == "0" or bool(shard and shard[0]))
    started, images_done = time.time(), 0
    rows = read_table(plan.table, plan.schema, skip_first_line=flags.skip_first_line, policy=policy,
                      start_line=progress.last_line)
    if shard:
        rows = (row for row in rows if row.line_number % shard[1] == shard[0])
    decoded: dict[int, tuple] = {}  # line → its input images, while its batch waits
    from_images = plan.image_column or plan.control_columns

    def with_images(rows):
        for row in rows:
            if from_images:
                try:
                    decoded[row.line_number] = plan.image_inputs(row)
                except BadRow as bad:
                    policy.handle(plan.table, row.line_number, bad)
                    continue
            yield row

    rows = with_images(rows)

    batch_times: list[tuple[float, int]] = []  # (seconds, images) per batch, for the closing log line

    def flush(batch) -> None:
        nonlocal images_done
        if not batch:
            return
        batch_start = time.perf_counter()
        prompts = [str(row[plan.prompt_column]) for row in batch]
        out_rows: dict[int, list] = {row.line_number: [] for row in batch}
        for iteration in range(settings.n_iter):
            jobs = [(row, prompt, iteration * settings.n_samples + s) for row, prompt in zip(batch, prompts)
                    for s in range(settings.n_samples)]
            seeds = [image_seed(flags.random_seed, row.line_number, sample) for row, _, sample in jobs]
            inputs = None
            if from_images:
                per_job = [decoded[row.line_number] for row, _, _ in jobs]
                inputs = ImageInputs(
                    images=[i for i, _, _ in per_job] if plan.image_column else None,
                    masks=[m for _, m, _ in per_job] if plan.mask_column else None,
                    controls=[[c[k] for _, _, c in per_job] for k in range(len(plan.control_columns))] or None)
            images = generator([prompt for _, prompt, _ in jobs], seeds, **({"inputs": inputs} if inputs else {}))
            for (row, prompt, sample), seed, image in zip(jobs, seeds, images):
                # The ProduceID from the run and the image's place in it: a rerun or resume writes the same bytes
                label = labels.label(derived_id(run_id, row.line_number, sample))
                data = encode_image(image, image_format, label=label)
                idx = str(row.values.get("idx", row.line_number))
                path = files.write(idx, row.line_number, prompt, sample, data) if files else ""
                cells = {"idx": idx, "text": prompt, "gen_imgbase64": base64.b64encode(data).decode("ascii"),
                         "sample_id": sample, "seed": seed, "image_path": path,
                         "aigc_produce_id": label.produce_id if label else ""}
                out = ([row.line_number] if shard else []) + [cells[c] for c in plan.output_columns]
                for column in plan.append_columns:
                    value = row[column]
                    out.append(",".join(map(str, value)) if isinstance(value, list) else value)
                out_rows[row.line_number].append(out)
        for row in batch:
            decoded.pop(row.line_number, None)
        # Rows of one batch are written together, in input order, then the progress record moves past them.
        writer.write_rows([r for row in batch for r in out_rows[row.line_number]])
        progress.last_line = batch[-1].line_number
        progress.rows += sum(len(v) for v in out_rows.values())
        progress.save()
        images_done += len(batch) * plan.samples_per_row
        batch_times.append((time.perf_counter() - batch_start, len(batch) * plan.samples_per_row))
        bar.update(len(batch))
        bar.set_postfix(img_s=f"{images_done / max(time.time() - started, 1e-9):.2f}")

    batch = []
    try:
        with torch.inference_mode():
            for row in rows:
                batch.append(row)
                if len(batch) == flags.micro_batch_size:
                    flush(batch)
                    batch = []
            flush(batch)
    except UserError:
        if not resuming and progress.rows == 0:  # e.g. every row bad: leave no empty output that looks like a result
            writer.close()
            for path in (outputs, progress.path):
                if os.path.exists(path):
                    os.remove(path)
        raise
    finally:
        writer.close()
        bar.close()
    progress.save(done=True)
    message = f"wrote {progress.rows} rows ({plan.samples_per_row} per prompt) to {outputs}"
    if files:
        message += f"; images under {os.path.abspath(settings.image_prefix)}"
    if policy.total:
        message += f"; {policy.summary()}"
    logger.info(message)
    if batch_times:
        logger.info(timing_summary(batch_times))
    return 0


def timing_summary(batch_times: list[tuple[float, int]]) -> str:
    """One line on where generation time went: the first batch (which pays compilation and warm-up) and the steady
    rate of the batches after it — what a longer job would run at."""
    seconds = sum(t for t, _ in batch_times)
    images = sum(n for _, n in batch_times)
    line = f"generation: {images} images in {seconds:.1f} s; first batch {batch_times[0][0]:.1f} s"
    rest = batch_times[1:]
    if rest:
        line += f", then {sum(t for t, _ in rest) / sum(n for _, n in rest):.3f} s/image (steady)"
    return line
