"""Low-bit frozen weights (base_precision=int8|fp8|nf4, modelzoo/lowbit.py): the bytes of a reduced-width denoiser
held in bf16 and quantised by torchao, measured two ways in a child process per row (the module's tensors, and the
RSS it adds once built, the interpreter and libraries already loaded), beside what the memory plan counts
(``lowbit.frozen_param_bytes`` × its parameters) and one forward pass's seconds.

    python bench/lowbit_memory.py                                    # both presets, bf16 int8 fp8 nf4
    python bench/lowbit_memory.py --presets configs/pai_diffusion_arch.json --precisions bf16,int8

The presets: PAI-Diffusion's UNet at half width (configs/pai_diffusion_arch.json, convolutions and linear layers) and
Z-Image's transformer with its widths cut (bench/configs/zimage_reduced.json, linear layers but for norms and
embeddings). Random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("configs/pai_diffusion_arch.json", "bench/configs/zimage_reduced.json")


def rss_bytes() -> int:
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed fp32/bf16 weights returned to the system before reading
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_denoiser(preset_path: str):
    """The preset's denoiser with random weights, in bf16, and an input for one forward pass."""
    import torch
    from diffusers import UNet2DConditionModel, ZImageTransformer2DModel

    with open(os.path.join(ROOT, preset_path), encoding="utf-8") as handle:
        preset = json.load(handle)
    torch.manual_seed(0)
    if preset.get("family") == "zimage":
        module = ZImageTransformer2DModel(**preset["transformer"]).to(torch.bfloat16).eval()
        size = preset["image_size"] // 8
        features = preset["transformer"]["cap_feat_dim"]
        inputs = dict(x=[torch.randn(16, 1, size, size, dtype=torch.bfloat16)], t=torch.tensor([0.5]),
                      cap_feats=[torch.randn(32, features, dtype=torch.bfloat16)])
    else:
        unet = preset["unet"]
        module = UNet2DConditionModel(**unet).to(torch.bfloat16).eval()
        inputs = dict(sample=torch.randn(1, 4, unet["sample_size"], unet["sample_size"], dtype=torch.bfloat16),
                      timestep=torch.tensor([500]),
                      encoder_hidden_states=torch.randn(1, 32, unet["cross_attention_dim"], dtype=torch.bfloat16))
    return module, inputs


def measure(preset_path: str, precision: str) -> dict:
    """One row, in this process: build, quantise, measure."""
    import torch

    from modelzoo import lowbit

    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    before = rss_bytes()
    module, inputs = build_denoiser(preset_path)
    count = sum(p.numel() for p in module.parameters())
    planned = count * (2 if precision == "bf16" else lowbit.frozen_param_bytes(module, count, precision))
    if precision != "bf16":
        lowbit.quantise_frozen(module.requires_grad_(False), precision)
    held = rss_bytes() - before
    with torch.no_grad():
        module(**inputs)  # the first pass allocates
        start = time.perf_counter()
        module(**inputs)
        seconds = time.perf_counter() - start
    return dict(preset=preset_path, precision=precision, parameters=count, tensor_bytes=lowbit.tensor_bytes(module),
                rss_bytes=held, planned_bytes=int(planned), forward_s=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--precisions", default="bf16,int8,fp8,nf4")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "PRECISION"), help=argparse.SUPPRESS)  # a child's row
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*args.one)))
        return
    print(f"{'preset':36} {'base':5} {'params':>8} {'tensors':>10} {'RSS':>10} {'plan':>10} {'vs bf16':>8} "
          f"{'forward':>8}")
    for preset in args.presets.split(","):
        bf16 = None
        for precision in args.precisions.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", preset, precision], capture_output=True,
                                 text=True, cwd=ROOT, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            bf16 = bf16 or row
            mib = 2 ** 20
            print(f"{preset:36} {precision:5} {row['parameters'] / 1e6:7.1f}M {row['tensor_bytes'] / mib:7.1f} MiB "
                  f"{row['rss_bytes'] / mib:6.1f} MiB {row['planned_bytes'] / mib:6.1f} MiB "
                  f"{row['tensor_bytes'] / bf16['tensor_bytes']:7.1%} {row['forward_s']:7.2f}s", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
