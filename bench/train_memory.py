"""Training memory: the measured peak RSS and s/step of real training runs beside the memory plan's estimate.

For an architecture config (random weights), each recipe runs ``easynlp --mode=train`` in its own child process for a
few optimiser steps at a resolution and micro-batch, checkpoint at the end (the save is part of the peak), without
TensorBoard sample images. The child's peak RSS comes from ``os.wait4`` (its ``ru_maxrss``); s/step from the
trainer's per-step log lines (images/s at --logging_steps=1, the first step left out: it allocates the optimiser
state); the estimate is the one the run logs before its first step (``easynlp_ldm/memory.py``). A recipe whose
estimate exceeds the RAM refuses itself (exit 2, the estimate printed) instead of being killed, unless ``--force``.

    python bench/train_memory.py                                   # SD-1.5 size (1 031 M parameters) at 512²
    python bench/train_memory.py --resolution 256 --recipes default,memory
    python bench/train_memory.py --preset configs/pai_diffusion_arch.json --resolution 256
    python bench/train_memory.py --preset configs/shapes_ldm_small.json --steps 3

Prints one row per recipe: measured peak, estimate, estimate/measured, s/step, the checkpoint's size and its
training state's size beside the model's.

Measured 2026-11-25 on the project's CPU machine (2 shared cores, 23.5 GiB RAM; other jobs ran beside, so s/step is
noisy), random weights, 3 steps of micro-batch 1 (2 for the last block) + the checkpoint at the end:

    recipe      arch / size        peak RSS   estimate  est/meas  s/step  checkpoint (model + training state)
    default     SD-1.5 512²        18.75 GiB  18.90     1.01      16      3.83 + 12.81 GiB (4.34× the model)
    memory      SD-1.5 512²        10.61 GiB  10.60     1.00      21      3.83 + 0.00 GiB (1.00×)
    act-fp32    SD-1.5 512²        11.06 GiB  11.00     0.99      23      3.83 + 0.00 GiB
    act-amp     SD-1.5 512²        11.34 GiB  11.20     0.99      20      3.83 + 0.00 GiB
    default     SD-1.5 256²        18.21 GiB  18.30     1.01       9      3.83 + 12.81 GiB
    memory      SD-1.5 256²        10.56 GiB  10.50     0.99      14      3.83 + 0.00 GiB
    default     PAI-Diffusion 256²  6.00 GiB   5.90     0.98       1.4    1.45 + 3.28 GiB (3.26×)
    memory      PAI-Diffusion 256²  4.09 GiB   3.90     0.95       3.0    1.45 + 0.00 GiB
    default     SD-1.5 512², mb 2  20.10 GiB  19.80     0.99      27      3.83 + 12.81 GiB
    memory      SD-1.5 512², mb 2  10.79 GiB  10.70     0.99      26      3.83 + 0.00 GiB

The coefficients of easynlp_ldm/memory.py were fitted on the first six rows' first run (SD-1.5, micro-batch 1); the
PAI-Diffusion and micro-batch-2 rows were not used to fit them. "memory" is full fine-tuning with gradient
checkpointing + bf16 autocast + Adafactor + no EMA + save_optimizer=False: 10.6 GiB for SD-1.5 at 512² (target
≤ 16 GB), checkpoint 1.00× the model (its training state hard-links the model's weights). On this CPU it is slower
per step than the default (recomputation, bf16 on CPU).

The DiT families (modelzoo/families/dit_memory.py): a random folder of bench/configs/zimage_reduced.json, Z-Image's
layout with its widths cut (all 30 layers + 2 noise- and 2 context-refiner layers, head_dim 128 with 5 heads: dim 640;
a 36-layer Qwen3 of width 256; FLUX's VAE at full size; 190 M transformer parameters, 1.14 GiB of weights in all),
train_target=transformer unless the recipe is a LoRA, captions cut to 32 tokens:

    python bench/train_memory.py --preset configs/zimage_reduced.json --resolution 512 --steps 2 \\
        --recipes act-fp32,default,act-amp,act-ckpt,memory,lora16-fp32,lora16-ckpt,lora16
    python bench/train_memory.py --preset configs/zimage_turbo.json --plan    # Z-Image-Turbo's own, on a 24 GB GPU

Measured 2026-12-07 on the project's CPU machine (2 shared cores of an AMD EPYC with avx512_bf16, 23.5 GiB RAM, other
jobs beside), 2 steps + the checkpoint; the estimate is the one the run logs with the coefficients as committed
(recomputed for the rows run before the last coefficient changed, from the same settings):

    recipe       size, micro-batch   peak RSS   estimate  est/meas   used to fit
    act-fp32     256², 1             2.67 GiB   2.60      0.97       scale (full, no checkpointing)
    act-fp32     512², 1             4.93       4.98      1.01       scale (full, no checkpointing)
    act-amp      256², 1             3.08       2.88      0.93       AMP weight copies
    act-amp      512², 1             4.81       4.85      1.01       AMP weight copies
    act-ckpt     256², 1             2.36*      2.50*     1.06       checkpoint scale (2.47 / 2.62 before)
    act-ckpt     512², 1             2.83       2.81      0.99       checkpoint scale
    lora16-fp32  256², 1             2.46       2.43      0.99       scale (LoRA)
    memory       768², 1             3.51       3.42      0.97       attention backward (CPU)
    lora16       768², 1             2.63       2.89      1.10       attention backward (CPU)
    lora16-ckpt  512², 1             2.62*      2.60*     0.99       LoRA fp32 + checkpointing (2.76 / 2.68 before)
    lora16-ckpt  768², 1             4.21       4.15      0.99       LoRA fp32 + checkpointing
    default      256², 1             4.87       4.71      0.97       held out
    default      512², 1             6.96       7.09      1.02       held out
    memory       256², 1             2.44*      2.60*     1.06       held out (2.57 / 2.69 before)
    memory       512², 1             2.65*      2.70*     1.02       held out (2.84 / 2.86 before)
    lora16-fp32  512², 1             4.62       4.83      1.05       held out
    lora16-ckpt  256², 1             1.75*      1.90*     1.08       held out (1.90 / 1.97 before)
    lora16       256², 1             1.64*      1.80*     1.09       held out (1.77 / 1.83 before)
    lora16       512², 1             2.05       2.23      1.09       held out
    act-ckpt     768², 1             3.64       3.52      0.97       held out
    act-fp32     256², 2             3.28       3.27      1.00       held out
    default      256², 2             5.42       5.38      0.99       held out
    lora16-fp32  256², 2             3.24       3.12      0.96       held out
    act-amp      256², 2             3.85       3.44      0.89       held out

Every row within 0.89-1.10 of its peak. Qwen-Image's coefficients are these, not measured on a Qwen-Image layout.
The rows marked * were measured again the same day after the text encoder began to leave memory once the
text-embedding cache is filled (its 0.12 GiB of fp32 weights here; the plan counts them at load and in the
cache-filling phase only): the peak RSS dropped by 0.11-0.19 GiB, the estimate by 0.03-0.16 GiB (the logged estimate
has one decimal; a LoRA's peak at 256² is now the cache-filling phase); the other rows were measured with the encoder
resident and are not comparable to today's estimate to better than its 0.12 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GIB = 1024 ** 3

# Recipe name → (extra flags, user-defined parameters). Every recipe also gets the common settings of ``run``.
RECIPES: dict[str, tuple[list[str], str]] = {
    # Full fine-tuning as the seed's command does it: AdamW, fp32, EMA on the training device, optimiser saved.
    "default": ([], ""),
    # Full fine-tuning, the best memory recipe: gradient checkpointing, bf16 autocast, Adafactor, no EMA, checkpoints
    # without optimiser state.
    "memory": (["--use_amp"], "gradient_checkpointing=True optimizer=adafactor use_ema=False save_optimizer=False"),
    # The same with the EMA kept (on a GPU it would live in RAM with ema_device=cpu).
    "memory+ema": (["--use_amp"], "gradient_checkpointing=True optimizer=adafactor ema_device=cpu "
                                  "save_optimizer=False"),
    # Calibration of the activation coefficients: the fixed parts small (Adafactor, no EMA), no checkpointing, so
    # the peak is the training step's and the activations a large part of it; fp32 and bf16 autocast.
    "act-fp32": ([], "optimizer=adafactor use_ema=False save_optimizer=False"),
    "act-amp": (["--use_amp"], "optimizer=adafactor use_ema=False save_optimizer=False"),
    # LoRA adapters of the UNet's attention (the model frozen), with checkpointing and bf16 autocast.
    "lora4": (["--use_amp"], "train_target=lora lora_rank=4 gradient_checkpointing=True"),
    "lora16": (["--use_amp"], "train_target=lora lora_rank=16 gradient_checkpointing=True"),
    # LoRA rank 16 in fp32, without and with gradient checkpointing (the activation counts of a frozen model).
    "lora16-fp32": ([], "train_target=lora lora_rank=16"),
    "lora16-ckpt": ([], "train_target=lora lora_rank=16 gradient_checkpointing=True"),
    # Full fine-tuning with the fixed parts small and gradient checkpointing, fp32 (its activation coefficient).
    "act-ckpt": ([], "optimizer=adafactor use_ema=False save_optimizer=False gradient_checkpointing=True"),
}
# A DiT preset (``"family"`` in its JSON, e.g. bench/configs/zimage_reduced.json) trains train_target=transformer
# where a recipe names no target, with the captions cut to DIT_TEXT_TOKENS tokens (each cached embedding is then
# exactly as long as the plan counts: it counts the text length, an upper bound, at every step).
DIT_TEXT_TOKENS = 32

STEP_LINE = re.compile(r"(\d\d):(\d\d):(\d\d) \S+ easynlp.trainer: step (\d+)/\d+ epoch \d+: loss \S+ lr \S+ "
                       r"grad_norm \S+ (\S+) images/s")
PLAN_LINE = re.compile(r"memory plan: estimated peak ([\d.]+) GiB")


def folder_bytes(path: str, seen: set | None = None) -> int:
    """Bytes of the files under ``path``, each inode counted once (hard links are shared, not copies)."""
    seen = set() if seen is None else seen
    total = 0
    for base, _dirs, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(base, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def run_recipe(name: str, model_dir: str, data: str, out: str, args) -> dict:
    extra, udp = RECIPES[name]
    rows = args.micro_batch * args.steps
    argv = [sys.executable, "-m", "easynlp_ldm.cli", "--mode=train", f"--tables={os.path.join(data, 'T2I_train.tsv')}",
            "--input_schema=idx:str:1,text:str:1,imgbase64:str:1", "--first_sequence=text",
            "--second_sequence=imgbase64", f"--checkpoint_dir={out}", f"--micro_batch_size={args.micro_batch}",
            "--epoch_num=1", "--learning_rate=1e-5", "--logging_steps=1", "--random_seed=0", *extra,
            f"--user_defined_parameters=pretrain_model_name_or_path={model_dir} resolution={args.resolution} "
            f"sample_images=0 memory_check={not args.force} {udp}"]
    if args.family:  # a DiT: the transformer is the target unless the recipe names one
        argv[-1] += "" if "train_target=" in udp else " train_target=transformer"
        argv.insert(-1, f"--sequence_length={DIT_TEXT_TOKENS}")
    env = dict(os.environ, PYTHONPATH=ROOT, EASYNLP_PROGRESS="0")
    start = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _pid, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    plan = PLAN_LINE.search(output)
    steps = [(int(m.group(4)), 3600 * int(m.group(1)) + 60 * int(m.group(2)) + int(m.group(3)), float(m.group(5)))
             for m in STEP_LINE.finditer(output)]
    # Seconds per step after the first (which allocates the optimiser state): from the logged images/s when it has
    # digits to spare, else from the log lines' clock (1 s resolution; these steps take much longer).
    later = [args.micro_batch / speed for step, _, speed in steps if step > 1 and speed >= 0.5]
    if not later and len(steps) > 1:
        later = [(b[1] - a[1]) % 86400 for a, b in zip(steps, steps[1:])]
    result = {"recipe": name, "rc": process.returncode, "peak": usage.ru_maxrss * 1024, "wall": wall,
              "estimate": float(plan.group(1)) * GIB if plan else None,
              "s_step": sorted(later)[len(later) // 2] if later else None, "rows": rows}
    if process.returncode == 0:
        seen: set = set()
        result["model_bytes"] = folder_bytes(os.path.join(out, "last"), seen)
        result["state_bytes"] = folder_bytes(os.path.join(out, "training_state"), seen)
    result["tail"] = output[-3000:]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=os.path.join(ROOT, "configs", "sd15_arch.json"),
                        help="an SD architecture (configs/*.json) or a DiT layout (bench/configs/*.json); a relative "
                        "path is looked up here, then under the repository and bench/")
    parser.add_argument("--resolution", type=int, default=0, help="0: the preset's image_size")
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--recipes", default="default,memory", help=f"comma-separated: {', '.join(RECIPES)}")
    parser.add_argument("--force", action="store_true", help="run recipes whose estimate exceeds the RAM")
    parser.add_argument("--workdir", default="", help="where the model, data and checkpoints go (default: a "
                        "temporary folder, removed at the end)")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("--plan", action="store_true", help="run nothing: print the memory plan's estimates of a LoRA "
                        "of a DiT preset's real architecture (e.g. configs/zimage_turbo.json) on a GPU, built on the "
                        "meta device (no weights)")
    args = parser.parse_args()
    if args.plan:
        print_gpu_lora_plan(resolve_preset(args.preset), args.resolution or 1024)
        return

    import torch

    from appzoo.latent_diffusion.memory_plan import check_latent_diffusion_training  # noqa: F401
    from easynlp_ldm.memory import available_memory
    from shapes_data import generate_dataset

    args.preset = resolve_preset(args.preset)
    with open(args.preset, encoding="utf-8") as handle:
        preset = json.load(handle)
    args.family = preset.get("family", "")
    args.resolution = args.resolution or int(preset.get("image_size", 512))
    work = args.workdir or tempfile.mkdtemp(prefix="train-memory-")
    os.makedirs(work, exist_ok=True)
    try:
        data, model_dir = os.path.join(work, "data"), os.path.join(work, "model")
        if not os.path.isfile(os.path.join(data, "T2I_train.tsv")):
            generate_dataset(data, seed=0, num_train=args.micro_batch * args.steps, num_val=0, num_test=0,
                             num_heldout=0, image_size=args.resolution)
        model_file = build_model_folder(args.preset, model_dir, args.resolution)
        ram, source = available_memory("cpu")
        print(f"preset {os.path.relpath(args.preset, ROOT)}, {args.resolution}², micro-batch {args.micro_batch}, "
              f"{args.steps} steps + checkpoint; model file {model_file / GIB:.2f} GiB; {ram / GIB:.1f} GiB {source}; "
              f"{torch.get_num_threads()} threads", flush=True)
        rows = []
        for name in args.recipes.split(","):
            out = os.path.join(work, f"out-{name}")
            shutil.rmtree(out, ignore_errors=True)
            row = run_recipe(name, model_dir, data, out, args)
            shutil.rmtree(out, ignore_errors=True)
            rows.append(row)
            print(format_row(row), flush=True)
            if row["rc"] != 0:
                print(row["tail"], flush=True)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(rows, handle, indent=1)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


def resolve_preset(path: str) -> str:
    """``path`` as given, else relative to the repository, else to bench/ (``--preset configs/zimage_reduced.json``
    names bench/configs/zimage_reduced.json; the SD architectures are the repository's configs/)."""
    for candidate in (path, os.path.join(ROOT, path), os.path.join(ROOT, "bench", path)):
        if os.path.isfile(candidate):
            return candidate
    raise SystemExit(f"--preset {path}: no such file here, under {ROOT} or under its bench/")


def build_model_folder(path: str, folder: str, resolution: int) -> int:
    """A random model of the preset at ``path`` (an SD architecture, or a DiT layout: ``"family"`` in its JSON) in
    ``folder`` unless it is there already; the bytes of its weight files."""
    with open(path, encoding="utf-8") as handle:
        preset = json.load(handle)
    if preset.get("family"):
        return build_dit_folder(preset, folder, resolution)
    if not os.path.isfile(os.path.join(folder, "pytorch_model.bin")):
        from modelzoo.families import sd
        from modelzoo.presets import build_from_preset
        from modelzoo.tiny import write_vocab

        with tempfile.TemporaryDirectory() as scratch:
            vocab = os.path.join(scratch, "vocab.txt")
            write_vocab(vocab)
            sd.save(build_from_preset(path, vocab), folder)
    return os.path.getsize(os.path.join(folder, "pytorch_model.bin"))


def build_dit_folder(preset: dict, folder: str, resolution: int) -> int:
    """A random DiT folder of the preset's layout (modelzoo/tiny_dit.py's builder, the preset's sizes replacing the
    tiny ones); the bytes of its weight files."""
    from modelzoo.tiny_dit import make_tiny_zimage_model

    if preset["family"] != "zimage":
        raise SystemExit(f"family {preset['family']!r}: only Z-Image layouts are built here")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        overrides = {part: preset[part] for part in ("transformer", "vae", "text_encoder") if part in preset}
        make_tiny_zimage_model(folder, image_size=resolution, overrides=overrides)
    return sum(os.path.getsize(os.path.join(base, name)) for base, _, names in os.walk(folder) for name in names
               if name.endswith((".safetensors", ".bin")))


def meta_zimage_model(preset: dict, dtype):
    """A ``DiTModel`` of a Z-Image preset's architecture on the meta device (shapes only, no memory) in ``dtype``."""
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import Qwen3Config, Qwen3Model

    from modelzoo.families.dit import DiTModel

    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32": none here, a plan of shapes
    with torch.device("meta"):
        transformer = ZImageTransformer2DModel(**preset["transformer"]).to(dtype)
        vae = AutoencoderKL(**preset["vae"]).to(dtype)
        text_encoder = Qwen3Model(Qwen3Config(**preset["text_encoder"])).to(dtype)
    return DiTModel("zimage", transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=None,
                    scheduler_config={}, image_size=preset.get("image_size", 1024), vae_scale_factor=8,
                    latent_channels=16, text_length_limit=preset["text_encoder"]["max_position_embeddings"])


def print_gpu_lora_plan(path: str, resolution: int, rank: int = 16, limit_gib: float = 24.0) -> None:
    """The plan's estimate of a rank-``rank`` LoRA of the preset's transformer at ``resolution``² on a GPU: bf16
    weights, bf16 autocast, micro-batch 1, AdamW on the adapters, 512 text tokens (the pipeline's default length, an
    upper bound), with and without gradient checkpointing; with the text encoder leaving memory once the
    text-embedding cache is filled (a run of a model folder: its weights count in the cache-filling phase only, the
    peak is the larger of that phase and the step) and resident throughout (a model read from no folder). "fits"
    within the plan's 10 % margin; the CUDA context (~0.5 GiB) is not counted. An estimate, not a measurement."""
    import torch

    from easynlp_ldm.memory import FIT_MARGIN, GIB, MemorySettings, estimate
    from modelzoo.families import family_of

    with open(path, encoding="utf-8") as handle:
        preset = json.load(handle)
    model = meta_zimage_model(preset, torch.bfloat16)
    family = family_of(model)
    print(f"{os.path.relpath(path, ROOT)}: LoRA rank {rank} of the transformer at {resolution}² on a GPU, bf16 "
          f"weights + bf16 autocast, micro-batch 1, AdamW, 512 text tokens (estimates, not measured)")
    for text_encoder, leaves in (("leaves after caching", True), ("resident", False)):
        footprint = family.memory_footprint(model, train_target="lora", text_length=512, lora_rank=rank,
                                            text_encoder_leaves=leaves)
        for checkpointing in (False, True):
            settings = MemorySettings(micro_batch_size=1, resolution=resolution, gradient_checkpointing=checkpointing,
                                      use_amp=True, optimizer="adamw", use_ema=False, ema_device="",
                                      save_optimizer=True, device="cuda")
            result = estimate(footprint, settings)
            verdict = ("fits" if result.peak <= FIT_MARGIN * limit_gib * GIB else
                       "at the edge of" if result.peak <= limit_gib * GIB else "does not fit")
            print(f"  text encoder {text_encoder:<20}  gradient_checkpointing={checkpointing!s:<5}  "
                  f"{verdict} {limit_gib:g} GiB: {result.describe()}; step {result.device['step'] / GIB:.1f} GiB")


def format_row(row: dict) -> str:
    estimate = row["estimate"]
    text = f"{row['recipe']:<11} exit {row['rc']:>3}  peak RSS {row['peak'] / GIB:6.2f} GiB  estimate "
    text += f"{estimate / GIB:6.2f} GiB  ratio {estimate / row['peak']:.2f}" if estimate else "     n/a"
    text += f"  {row['s_step']:.1f} s/step" if row["s_step"] else "  s/step n/a"
    text += f"  wall {row['wall']:.0f} s"
    if "model_bytes" in row:
        whole = (row["model_bytes"] + row["state_bytes"]) / row["model_bytes"]
        text += (f"  checkpoint: model {row['model_bytes'] / GIB:.2f} GiB + training state "
                 f"{row['state_bytes'] / GIB:.2f} GiB ({whole:.2f}× the model)")
    return text


if __name__ == "__main__":
    main()
