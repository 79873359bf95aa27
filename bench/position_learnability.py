"""Issue 19's question, asked as directly as possible: can the embedded model's UNet learn to put the object where the
caption says, at the noisiest timesteps where the layout is decided? Size is the control: the same run, the same
data, the same loss.

The shipped model is fine-tuned (UNet and text encoder, AdamW) on shapes that are big or small and in the top-left
or bottom-right cell only (--cells two) or in any of the nine (--cells nine), captioned "<position>有一个<size>的
<colour><shape>" (--captions fixed) or in the data set's own templates that state a position (--captions templates),
at t in [--t_min, 999] with the loss on the predicted clean latents (x0: the layout, undiluted by the noise the
epsilon loss mostly measures). Every --probe steps it predicts x0 from pure noise (t=999, 8 fixed noises) for
"<position>有一个<size>的红色圆形" and measures, on the latent deviation map |x0 - per-channel spatial median|: the
foreground's centroid (x, y in 0..1) and the share of latent pixels above half the map's maximum (area). The data
row gives the same measures on the training latents themselves; "slope" is the least-squares slope of the probed
centroids (x and y together) on the data's centroids per cell: 0 = the caption's position is ignored, 1 = followed.

Two variants test explanations: --pure_noise S gives a share S of the samples the noise alone as input (no trace of
the image, as at the first sampling step), so the caption is the only place the layout can come from;
--coord_map adds a fixed sine/cosine map of the latent pixel's (x, y) through a zero-initialised 1x1 convolution
(learning rate x10) to conv_in's output: a positional input, which a diffusers UNet2DConditionModel cannot hold.

    python bench/position_learnability.py [--steps 200] [--probe 50] [--t_min 900] [--lr 2e-4] [--model PATH]
        [--cells two|nine] [--captions fixed|templates] [--examples 512] [--pure_noise 0] [--coord_map]

Measured (2 cores, fp32, 1.5-1.8 s/step): see docs/embedded_model_research.md, "What is known about size and position".
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
from modelzoo.families import sd
from modelzoo.pretrained import DEFAULT_MODEL, embedded_models  # noqa: E402
from shapes_data.generate import (  # noqa: E402
    CAPTION_TEMPLATES,
    POSITION_PHRASES,
    POSITIONS,
    caption,
    render,
    sample_spec,
)

CELLS = {"two": ("左上", "右下"), "nine": POSITIONS}


def caption_of(position: str, size: str, colour: str, shape: str) -> str:
    return f"{POSITION_PHRASES[position][0]}有一个{size}的{colour}{shape}"


def layout_measures(x0: torch.Tensor) -> tuple[float, float, float]:
    """Mean centroid x, y and foreground area share of a batch of latents (N, C, H, W)."""
    cx, cy, area = layout_per_sample(x0)
    return float(cx.mean()), float(cy.mean()), float(area.mean())


def layout_per_sample(x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    background = x0.flatten(2).median(dim=2).values[:, :, None, None]
    dev = (x0 - background).abs().mean(1)  # N, H, W
    n, h, w = dev.shape
    ys = torch.linspace(0, 1, h).view(1, h, 1)
    xs = torch.linspace(0, 1, w).view(1, 1, w)
    weights = dev / dev.sum(dim=(1, 2), keepdim=True)
    cx, cy = (weights * xs).sum(dim=(1, 2)), (weights * ys).sum(dim=(1, 2))
    area = (dev > 0.5 * dev.amax(dim=(1, 2), keepdim=True)).float().mean(dim=(1, 2))
    return cx, cy, area


def slope(probed: list[tuple[float, float, float]], data: list[tuple[float, float, float]]) -> float:
    """Least-squares slope of the probed centroids (x and y) on the data's, over the cases."""
    p = torch.tensor([m[k] for m in probed for k in (0, 1)])
    d = torch.tensor([m[k] for m in data for k in (0, 1)])
    return float(((p - p.mean()) * (d - d.mean())).sum() / ((d - d.mean()) ** 2).sum())


def coordinate_features(size: int) -> torch.Tensor:
    """(1, 14, size, size): x - 0.5, y - 0.5 and sin/cos of pi * f * x and y for f = 1, 2, 3 at pixel centres."""
    grid = (torch.arange(size).float() + 0.5) / size
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    features = [xx - 0.5, yy - 0.5]
    for f in (1, 2, 3):
        for c in (xx, yy):
            features += [torch.sin(torch.pi * f * c), torch.cos(torch.pi * f * c)]
    return torch.stack(features)[None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="", help="model folder (default: the embedded model)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--probe", type=int, default=50)
    parser.add_argument("--t_min", type=int, default=900)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--cells", choices=sorted(CELLS), default="two")
    parser.add_argument("--captions", choices=("fixed", "templates"), default="fixed")
    parser.add_argument("--pure_noise", type=float, default=0.0, help="share of samples given the noise alone")
    parser.add_argument("--coord_map", action="store_true", help="add a positional input after conv_in")
    args = parser.parse_args()
    cases = [(p, z) for p in CELLS[args.cells] for z in ("大", "小")]
    torch.manual_seed(0)
    model = sd.load(args.model or embedded_models()[DEFAULT_MODEL]).float()
    alphas = DDPMScheduler.from_config(model.scheduler_config).alphas_cumprod
    rng = random.Random(0)
    specs = []
    while len(specs) < args.examples:
        spec = sample_spec(rng)
        if (spec.position, spec.size) in cases:
            specs.append(spec)
    if args.captions == "fixed":
        captions = [caption_of(s.position, s.size, s.colour, s.shape) for s in specs]
    else:
        caption_rng = random.Random(1)
        stating = [i for i, template in enumerate(CAPTION_TEMPLATES) if "{p}" in template]
        captions = [caption(s, caption_rng, template=caption_rng.choice(stating)) for s in specs]
    with torch.no_grad():
        pixels = torch.stack([preprocess_image(render(s), (64, 64)) for s in specs])
        latents = model.vae.encode(pixels).latent_dist.mean * model.vae_scaling_factor
    print(f"{len(specs)} training images; t in [{args.t_min}, 999]; x0 loss; lr {args.lr}; batch {args.batch}; "
          f"e.g. {captions[0]}")
    print("case        " + "  ".join(f"{p}{z}: cx    cy    area" for p, z in cases))
    data_row = []
    for p, z in cases:
        chosen = [i for i, s in enumerate(specs) if (s.position, s.size) == (p, z)]
        data_row.append(layout_measures(latents[chosen]))
    print("data        " + "  ".join(f"     {cx:.2f}  {cy:.2f}  {a:.2f}" for cx, cy, a in data_row))

    unet, text_encoder = model.unet, model.text_encoder
    params = list(unet.parameters()) + list(text_encoder.parameters())
    groups = [{"params": params, "lr": args.lr}]
    if args.coord_map:
        features = coordinate_features(latents.shape[-1])
        projection = torch.nn.Conv2d(features.shape[1], unet.conv_in.out_channels, 1, bias=False)
        torch.nn.init.zeros_(projection.weight)
        unet.conv_in.register_forward_hook(lambda module, inputs, output: output + projection(features))
        groups.append({"params": list(projection.parameters()), "lr": 10 * args.lr})
        params = params + list(projection.parameters())
    optimiser = torch.optim.AdamW(groups, lr=args.lr)
    generator = torch.Generator().manual_seed(1)
    probe_noise = torch.randn((8, *latents.shape[1:]), generator=torch.Generator().manual_seed(9))

    def predict_x0(x0, noise, t, texts, pure=None):
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        if pure is not None:
            noisy = torch.where(pure.view(-1, 1, 1, 1), noise, noisy)
        eps = unet(noisy, t, encoder_hidden_states=model.encode_prompts(texts)).sample
        return (noisy - (1 - a).sqrt() * eps) / a.sqrt()

    def probe(step: int) -> None:
        unet.eval()
        with torch.no_grad():
            row = []
            for p, z in cases:
                x0 = predict_x0(torch.zeros_like(probe_noise), probe_noise, torch.full((8,), 999),
                                [caption_of(p, z, "红色", "圆形")] * 8)
                row.append(layout_measures(x0))
        print(f"step {step:<6d}" + "  ".join(f"     {cx:.2f}  {cy:.2f}  {a:.2f}" for cx, cy, a in row)
              + f"  slope {slope(row, data_row):.2f}", flush=True)
        unet.train()

    probe(0)
    start = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(specs), (args.batch,), generator=generator)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(args.t_min, 1000, (args.batch,), generator=generator)
        pure = torch.rand(args.batch, generator=generator) < args.pure_noise if args.pure_noise else None
        loss = F.mse_loss(predict_x0(x0, noise, t, [captions[i] for i in idx.tolist()], pure), x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        optimiser.zero_grad()
        if step % args.probe == 0:
            probe(step)
    print(f"{(time.time() - start) / args.steps:.2f} s/step")


if __name__ == "__main__":
    main()
