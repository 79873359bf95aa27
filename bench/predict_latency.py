"""Generation latency of the embedded default model on this machine: seconds per image inside a batch.

    python bench/predict_latency.py [--batch 16] [--steps 20] [--repeats 2] [--model NAME_OR_DIR]

Runs `Generator` (what predict and serve use) on a batch of Chinese prompts after one warm-up batch, and prints
seconds per image (best of the repeats).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = ["白色背景上有一个红色的圆形", "一个蓝色的正方形，背景是黑色", "灰色背景上的黄色三角形", "请画一个绿色的圆形",
           "左上角有一个紫色的正方形", "橙色的三角形在白色背景的中间", "黑色背景上的红色正方形", "一个小小的蓝色圆形"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default="")
    parser.add_argument("--optimize", default="auto", choices=("none", "auto", "max", "openvino", "torch", "compile"))
    args = parser.parse_args()
    import torch

    from appzoo.latent_diffusion.generation import Generator
    from appzoo.latent_diffusion.loading import load_model
    from appzoo.latent_diffusion.settings import GenerationSettings

    model = load_model(args.model, optimize=args.optimize)
    settings = GenerationSettings(steps=args.steps)
    generate = Generator(model, settings)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    seeds = list(range(args.batch))
    with torch.inference_mode():
        generate(prompts, seeds)
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            generate(prompts, seeds)
            times.append(time.perf_counter() - start)
    best = min(times)
    print(f"optimize={args.optimize}; model {model.source_path}: {model.image_size}x{model.image_size}, "
          f"{args.steps} steps, guidance "
          f"{settings.guidance_scale}, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{best / args.batch:.3f} s per image ({best:.2f} s per batch; best of {args.repeats})")


if __name__ == "__main__":
    main()
