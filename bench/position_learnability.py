"""Issue 19's question, asked as directly as possible: can the embedded model's UNet learn to put the object where the
caption says, at the noisiest timesteps where the layout is decided? Size is the control: the same run, the same
data, the same loss.

The shipped model is fine-tuned (UNet and text encoder, AdamW) on shapes that are big or small and in the top-left
or bottom-right cell only, captioned "<position>有一个<size>的<colour><shape>", at t in [--t_min, 999] with the loss
on the predicted clean latents (x0: the layout, undiluted by the noise the epsilon loss mostly measures). Every
--probe steps it predicts x0 from pure noise (t=999, 8 fixed noises) for each caption and measures, on the latent
deviation map |x0 - per-channel spatial median|: the foreground's centroid (x, y in 0..1) and the share of latent
pixels above half the map's maximum (area). The data row gives the same measures on the training latents themselves.

    python bench/position_learnability.py [--steps 200] [--probe 50] [--t_min 900] [--lr 2e-4] [--model PATH]

Measured (2 cores, fp32, 1.45 s/step): see README, "What is known about size and position".
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers import DDPMScheduler  # noqa: E402

from appzoo.latent_diffusion.data import preprocess_image  # noqa: E402
from modelzoo.ldm import LatentDiffusion  # noqa: E402
from modelzoo.pretrained import DEFAULT_MODEL, embedded_models  # noqa: E402
from shapes_data.generate import POSITION_PHRASES, render, sample_spec  # noqa: E402

CASES = [(p, z) for p in ("左上", "右下") for z in ("大", "小")]


def caption_of(position: str, size: str, colour: str, shape: str) -> str:
    return f"{POSITION_PHRASES[position][0]}有一个{size}的{colour}{shape}"


def layout_measures(x0: torch.Tensor) -> tuple[float, float, float]:
    """Mean centroid x, y and foreground area share of a batch of latents (N, C, H, W)."""
    background = x0.flatten(2).median(dim=2).values[:, :, None, None]
    dev = (x0 - background).abs().mean(1)  # N, H, W
    n, h, w = dev.shape
    ys = torch.linspace(0, 1, h).view(1, h, 1)
    xs = torch.linspace(0, 1, w).view(1, 1, w)
    weights = dev / dev.sum(dim=(1, 2), keepdim=True)
    cx, cy = (weights * xs).sum(dim=(1, 2)), (weights * ys).sum(dim=(1, 2))
    area = (dev > 0.5 * dev.amax(dim=(1, 2), keepdim=True)).float().mean(dim=(1, 2))
    return float(cx.mean()), float(cy.mean()), float(area.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model folder (default: the embedded model)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--probe", type=int, default=50)
    parser.add_argument("--t_min", type=int, default=900)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--examples", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LatentDiffusion.from_pretrained(args.model or embedded_models()[DEFAULT_MODEL]).float()
    alphas = DDPMScheduler.from_config(model.scheduler_config).alphas_cumprod
    rng = random.Random(0)
    specs = []
    while len(specs) < args.examples:
        spec = sample_spec(rng)
        if (spec.position, spec.size) in CASES:
            specs.append(spec)
    captions = [caption_of(s.position, s.size, s.colour, s.shape) for s in specs]
    with torch.no_grad():
        pixels = torch.stack([preprocess_image(render(s), (64, 64)) for s in specs])
        latents = model.vae.encode(pixels).latent_dist.mean * model.vae_scaling_factor
    print(f"{len(specs)} training images; t in [{args.t_min}, 999]; x0 loss; lr {args.lr}; batch {args.batch}")
    print("case        " + "  ".join(f"{p}{z}: cx    cy    area" for p, z in CASES))
    data_row = []
    for p, z in CASES:
        chosen = [i for i, s in enumerate(specs) if (s.position, s.size) == (p, z)]
        data_row.append(layout_measures(latents[chosen]))
    print("data        " + "  ".join(f"     {cx:.2f}  {cy:.2f}  {a:.2f}" for cx, cy, a in data_row))

    unet, text_encoder = model.unet, model.text_encoder
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimiser = torch.optim.AdamW(params, lr=args.lr)
    generator = torch.Generator().manual_seed(1)
    probe_noise = torch.randn((8, *latents.shape[1:]), generator=torch.Generator().manual_seed(9))

    def predict_x0(x0, noise, t, texts):
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        eps = unet(noisy, t, encoder_hidden_states=model.encode_prompts(texts)).sample
        return (noisy - (1 - a).sqrt() * eps) / a.sqrt()

    def probe(step: int) -> None:
        unet.eval()
        with torch.no_grad():
            row = []
            for p, z in CASES:
                x0 = predict_x0(torch.zeros_like(probe_noise), probe_noise, torch.full((8,), 999),
                                [caption_of(p, z, "红色", "圆形")] * 8)
                row.append(layout_measures(x0))
        print(f"step {step:<6d}" + "  ".join(f"     {cx:.2f}  {cy:.2f}  {a:.2f}" for cx, cy, a in row), flush=True)
        unet.train()

    probe(0)
    start = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(specs), (args.batch,), generator=generator)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(args.t_min, 1000, (args.batch,), generator=generator)
        loss = F.mse_loss(predict_x0(x0, noise, t, [captions[i] for i in idx.tolist()]), x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        optimiser.zero_grad()
        if step % args.probe == 0:
            probe(step)
    print(f"{(time.time() - start) / args.steps:.2f} s/step")


if __name__ == "__main__":
    main()
