"""The UNet alone: an SD-1.5-architecture UNet2DConditionModel (random weights) at 256² (32×32 latents), batch 2,
per-step time for optimize=none/auto/max, and achieved FLOP/s as a fraction of the bf16 GEMM peak measured in the
same run.

    python bench/unet_speed.py [--steps 5] [--levels none,auto,max] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def gemm_peak(dtype, n: int = 4096, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--levels", default="none,auto,max")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from modelzoo.optimize import choose_dtype, optimize_unet

    latent = args.size // 8
    x = torch.randn(2, 4, latent, latent)
    t = torch.tensor([500, 500])
    context = torch.randn(2, 77, 768)
    peak = gemm_peak(torch.bfloat16)
    peak32 = gemm_peak(torch.float32)
    print(f"GEMM peak on this machine ({torch.get_num_threads()} threads): bf16 {peak / 1e12:.2f} TFLOP/s, "
          f"fp32 {peak32 / 1e12:.2f} TFLOP/s")
    flops = None
    results = {}
    for level in args.levels.split(","):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**SD15_UNET, "sample_size": latent}).eval()
        if flops is None:
            with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                unet(x, t, encoder_hidden_states=context)
            flops = counter.get_total_flops()
            print(f"SD-1.5 UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, "
                  f"{flops / 1e9:.1f} GFLOP per step at {args.size}², batch 2")
        dtype = choose_dtype(level, "", torch.device("cpu"))
        done = optimize_unet(unet, level, dtype)
        step = unet
        xin, cin = x.to(dtype), context.to(dtype)
        with torch.inference_mode():
            start = time.perf_counter()
            step(xin, t, encoder_hidden_states=cin)
            warmup = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(args.steps):
                step(xin, t, encoder_hidden_states=cin)
            per_step = (time.perf_counter() - start) / args.steps
        results[level] = per_step
        fraction = flops / per_step / peak
        layout = ", ".join(k for k, v in done.items() if v) or "default layout"
        print(f"optimize={level:4s} ({str(dtype).replace('torch.', '')}, {layout}): {per_step:.3f} s/step "
              f"(first call {warmup:.1f} s), {flops / per_step / 1e12:.2f} TFLOP/s = {fraction:.0%} of bf16 peak")
    if "none" in results:
        for level, value in results.items():
            print(f"speed-up {level}: {results['none'] / value:.2f}x")


if __name__ == "__main__":
    main()
