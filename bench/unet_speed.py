"""The UNet alone: an SD-1.5-architecture UNet2DConditionModel (random weights) at 256² (32×32 latents), batch 2,
per-step time for optimize=none/torch/compile/openvino, and achieved FLOP/s as a fraction of the GEMM peak of the
precision each level runs in, measured in the same run (fp32 always; bf16 where the CPU has native bf16).

    python bench/unet_speed.py [--steps 5] [--levels none,torch,compile,openvino] [--size 256] [--repeats 1]

``openvino`` is this project's OpenVINO backend (modelzoo/openvino_backend.py, what optimize=auto runs on CPU) on
the UNet: converted once (the conversion time is printed; the IR goes to a temporary folder), compiled for the
static shape, bf16 inference where the CPU has it. ``--repeats N`` times the steps N times and prints min/median.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
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


def prepare(level: str, unet, x, t, context):
    """→ (step function, dtype name, notes) for one level."""
    import torch

    from modelzoo.optimize import choose_dtype, optimize_unet

    if level == "openvino":
        from modelzoo.openvino_backend import OpenVINORunner, _UNetGraph, choose_precision, weights_key

        precision = choose_precision("")
        runner = OpenVINORunner(_UNetGraph(unet).eval(), "unet", weights_key(unet, {"graph": "unet"}), precision,
                                torch.get_num_threads())
        start = time.perf_counter()
        runner._ensure_ir((x, t, context))
        convert = time.perf_counter() - start
        return (lambda: runner(x, t, context)), precision, f"OpenVINO {precision}, converted in {convert:.0f} s"
    dtype = choose_dtype(level, "", torch.device("cpu"))
    done = optimize_unet(unet, level, dtype)
    xin, cin = x.to(dtype), context.to(dtype)
    layout = ", ".join(k for k, v in done.items() if v) or "default layout"
    return (lambda: unet(xin, t, encoder_hidden_states=cin)), str(dtype).replace("torch.", ""), layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--levels", default="none,torch,compile,openvino")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from modelzoo.optimize import cpu_supports_bf16

    latent = args.size // 8
    x = torch.randn(2, 4, latent, latent)
    t = torch.tensor([500, 500])
    context = torch.randn(2, 77, 768)
    peaks = {"float32": gemm_peak(torch.float32)}
    if cpu_supports_bf16():
        peaks["bfloat16"] = gemm_peak(torch.bfloat16)
    peaks["fp32"], peaks["bf16"] = peaks["float32"], peaks.get("bfloat16")  # OpenVINO's names for them
    print(f"GEMM peak on this machine ({torch.get_num_threads()} threads, 4096² matmul): fp32 "
          f"{peaks['float32'] / 1e12:.3f} TFLOP/s" + (f", bf16 {peaks['bfloat16'] / 1e12:.3f} TFLOP/s"
                                                      if peaks.get("bfloat16") else ", bf16: no native support"))
    flops = None
    results = {}
    with tempfile.TemporaryDirectory() as cache:
        os.environ["EASYNLP_OPENVINO_CACHE"] = cache
        for level in args.levels.split(","):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**{**SD15_UNET, "sample_size": latent}).eval()
            if flops is None:
                with torch.inference_mode(), FlopCounterMode(display=False) as counter:
                    unet(x, t, encoder_hidden_states=context)
                flops = counter.get_total_flops()
                print(f"SD-1.5 UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters, "
                      f"{flops / 1e9:.1f} GFLOP per step at {args.size}², batch 2")
            with torch.inference_mode():
                step, dtype, notes = prepare(level, unet, x, t, context)
                start = time.perf_counter()
                step()
                warmup = time.perf_counter() - start
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    times.append((time.perf_counter() - start) / args.steps)
            per_step = min(times)
            results[level] = per_step
            peak = peaks.get(dtype)
            share = f" = {flops / per_step / peak:.0%} of the {dtype} peak" if peak else ""
            spread = f" (min of {args.repeats}; median {statistics.median(times):.3f})" if args.repeats > 1 else ""
            print(f"optimize={level:8s} ({dtype}, {notes}): {per_step:.3f} s/step{spread} "
                  f"(first call {warmup:.1f} s), {flops / per_step / 1e12:.3f} TFLOP/s{share}", flush=True)
            del unet, step
    if "none" in results:
        print("speed-up over none: " + ", ".join(f"{level} {results['none'] / value:.2f}x"
                                                  for level, value in results.items()))


if __name__ == "__main__":
    main()
