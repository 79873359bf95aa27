"""End to end: 96 prompts, batches of 16, 20 steps, on the embedded model — this project's predict with
optimize=auto and optimize=max vs diffusers' StableDiffusionPipeline in fp32 on the same weights (exported with
export_format=diffusers), same scheduler, steps, guidance and batch size. Whole commands are timed (process start,
model load, compile warm-up and PNG writing included): that is what a user waits for. torch.compile's caches are
pointed at a fresh folder, so ``max`` is timed twice: its first run compiles from nothing, its second finds the
on-disk caches a user's second command would find.

    python bench/e2e_speed.py [--prompts 96] [--batch 16] [--steps 20] [--levels auto,max]

A level may carry parameter overrides after '+', e.g. ``--levels auto,auto+guidance_cutoff=0.6``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = ["白色背景上有一个红色的圆形", "一个蓝色的正方形，背景是黑色", "灰色背景上的黄色三角形", "请画一个绿色的圆形",
           "左上角有一个紫色的正方形", "橙色的三角形在白色背景的中间", "黑色背景上的红色正方形", "一个小小的蓝色圆形"]

DIFFUSERS_SCRIPT = r'''
import os, sys, torch
from diffusers import StableDiffusionPipeline
folder, prompts_path, out, batch, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
prompts = [line.rstrip("\n").split("\t")[1] for line in open(prompts_path, encoding="utf-8")]
pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
os.makedirs(out, exist_ok=True)
for start in range(0, len(prompts), batch):
    chunk = prompts[start:start + batch]
    generators = [torch.Generator("cpu").manual_seed(start + i) for i in range(len(chunk))]
    images = pipe(chunk, num_inference_steps=steps, guidance_scale=5.0, generator=generators).images
    for i, image in enumerate(images):
        image.save(os.path.join(out, f"{start + i:04d}.png"))
'''


def timed(command: list[str], cache_dir: str = "") -> float:
    env = dict(os.environ, PYTHONPATH=ROOT, EASYNLP_PROGRESS="0", EASYNLP_LOG_LEVEL="WARNING")
    if cache_dir:
        env["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--levels", default="auto,max")
    args = parser.parse_args()
    python = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        table = os.path.join(tmp, "prompts.tsv")
        with open(table, "w", encoding="utf-8") as handle:
            for i in range(args.prompts):
                handle.write(f"{i}\t{PROMPTS[i % len(PROMPTS)]}\n")
        folder = os.path.join(tmp, "diffusers")
        timed([python, "-m", "easynlp_ldm.cli", "--mode=export", f"--outputs={folder}",
               "--user_defined_parameters=export_format=diffusers"])
        base = timed([python, "-c", DIFFUSERS_SCRIPT, folder, table, os.path.join(tmp, "d_out"), str(args.batch),
                      str(args.steps)])
        print(f"{args.prompts} prompts, batch {args.batch}, {args.steps} steps, guidance 5, embedded model")
        print(f"diffusers StableDiffusionPipeline fp32: {base:.1f} s ({args.prompts / base:.2f} images/s)")
        cache = os.path.join(tmp, "compile_cache")
        runs = [(level, "") for level in args.levels.split(",")]
        if "max" in args.levels.split(","):
            index = runs.index(("max", ""))
            runs[index:index + 1] = [("max", " (first run: cold compile cache)"),
                                     ("max", " (second run: warm compile cache)")]
        for n, (spec, note) in enumerate(runs):
            level, *overrides = spec.split("+")
            udp = " ".join([f"n_samples=1 ddim_steps={args.steps} optimize={level}", *overrides,
                            f"write_image=True image_prefix={os.path.join(tmp, f'{level}{n}')}"])
            seconds = timed([python, "-m", "easynlp_ldm.cli", "--mode=predict", f"--tables={table}",
                             f"--outputs={os.path.join(tmp, f'{level}{n}.tsv')}", f"--micro_batch_size={args.batch}",
                             f"--user_defined_parameters={udp}"], cache)
            print(f"easynlp predict optimize={' '.join([level, *overrides])}{note}: {seconds:.1f} s "
                  f"({args.prompts / seconds:.2f} "
                  f"images/s), {base / seconds:.2f}x")


if __name__ == "__main__":
    main()
