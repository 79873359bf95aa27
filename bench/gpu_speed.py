"""GPU mode of the speed benches: Stable Diffusion 1.5's architecture (random weights, configs/sd15_arch.json) at
512², 50 steps, batch 1, guidance 7.5 — seconds per image for diffusers' StableDiffusionPipeline in fp16 (eager)
and for this project's generation with optimize=auto and optimize=max, in one run, plus the UNet's share. Target
(issue 7): ≤0.30 s per image on an H100.

    python bench/gpu_speed.py [--images 5] [--steps 50] [--size 512] [--levels auto,max]
    python bench/gpu_speed.py --device cpu --size 128 --steps 2 --images 1     (a smoke test of the code path)

It needs CUDA unless --device cpu is given. Each measurement starts after one warm-up image (for max: after its
compilation, whose time is printed separately).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPTS = ["一只在草地上奔跑的小狗", "雪山下的湖泊，清晨的阳光", "城市夜景，霓虹灯", "一碗热腾腾的拉面"]


def per_image(generate, device: str, images: int) -> tuple[float, float]:
    """(first call seconds, steady seconds per image) for ``generate(prompt, seed)``."""
    import torch

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    generate(PROMPTS[0], 0)
    sync()
    first = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(images):
        generate(PROMPTS[i % len(PROMPTS)], i + 1)
    sync()
    return first, (time.perf_counter() - start) / images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--images", type=int, default=5)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--levels", default="auto,max")
    parser.add_argument("--preset", default=os.path.join(ROOT, "configs", "sd15_arch.json"))
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_speed.py: no CUDA device is visible here; run it on a GPU machine "
                 "(or smoke-test the code path with --device cpu --size 128 --steps 2 --images 1)")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # model_device() then keeps this process on the CPU

    from modelzoo.families import sd
    from modelzoo.presets import build_from_preset
    from modelzoo.tiny import write_vocab

    with tempfile.TemporaryDirectory() as tmp:
        vocab = os.path.join(tmp, "vocab.txt")
        write_vocab(vocab, "".join(PROMPTS))
        model_dir = os.path.join(tmp, "model")
        model = build_from_preset(args.preset, vocab)
        unet_params = sum(p.numel() for p in model.unet.parameters()) / 1e6
        sd.save(model, model_dir)
        del model
        name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
        print(f"{name}: {os.path.relpath(args.preset, ROOT)} (UNet {unet_params:.0f} M parameters, random weights), "
              f"{args.size}², {args.steps} steps, batch 1, guidance {args.guidance}, {args.images} images each")

        base = run_baseline(args, model_dir)
        for level in args.levels.split(","):
            run_level(args, model_dir, level, base)


def run_baseline(args, model_dir: str) -> float:
    """diffusers' pipeline, fp16 on CUDA (fp32 on CPU), eager — what a diffusers user runs."""
    import torch

    from appzoo.latent_diffusion.generation import build_pipeline
    from modelzoo.families import sd

    dtype = torch.float16 if args.device == "cuda" else torch.float32
    pipe = build_pipeline(sd.load(model_dir).to(args.device, dtype).eval())

    def baseline(prompt, seed):
        pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance, height=args.size,
             width=args.size, generator=torch.Generator("cpu").manual_seed(seed))

    first, seconds = per_image(baseline, args.device, args.images)
    print(f"diffusers StableDiffusionPipeline {str(dtype).replace('torch.', '')} eager: {seconds:.3f} s/image "
          f"(first {first:.1f} s)", flush=True)
    return seconds


def run_level(args, model_dir: str, level: str, base: float) -> None:
    import torch

    from appzoo.latent_diffusion.generation import Generator
    from appzoo.latent_diffusion.loading import load_model
    from appzoo.latent_diffusion.settings import GenerationSettings

    model = load_model(model_dir, optimize=level)
    generate = Generator(model, GenerationSettings(steps=args.steps, guidance_scale=args.guidance, height=args.size,
                                                   width=args.size))
    unet_seconds = [0.0]
    forward = model.unet.forward

    def timed_unet(*a, **k):
        start = time.perf_counter()
        out = forward(*a, **k)
        if args.device == "cuda":
            torch.cuda.synchronize()
        unet_seconds[0] += time.perf_counter() - start
        return out

    model.unet.forward = timed_unet
    first, seconds = per_image(lambda prompt, seed: generate([prompt], [seed]), args.device, args.images)
    unet_share = unet_seconds[0] / (first + seconds * args.images)
    print(f"easynlp optimize={level} ({model.optimization['dtype']}): {seconds:.3f} s/image, {base / seconds:.2f}x "
          f"diffusers (first image {first:.1f} s incl. warm-up/compilation; UNet {unet_share:.0%} of the time)",
          flush=True)


if __name__ == "__main__":
    main()
