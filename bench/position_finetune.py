"""Issue 19's second experiment: fine-tune the shipped model on all nine cells with half of each batch at the noisiest
timesteps and the loss on the predicted clean latents (weight 1/SNR, capped at --wmax, on the epsilon loss), the
other half the usual epsilon loss; every --probe steps generate 72 images (9 positions × 2 sizes, 2 samples each,
"<background>背景，<position>有一个<size>的<colour><shape>", 20 steps, guidance 5) and judge them from pixels.

    python bench/position_finetune.py [--steps 1500] [--probe 300] [--t_min 900] [--high_frac 0.5] [--wmax 1000]
                                      [--lr 2e-4] [--examples 6000] [--out /tmp/position_finetune]

Measured (2 cores, fp32, 1.5 s/step, 45 min): see README, "What is known about size and position".
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers.training_utils import compute_snr  # noqa: E402

from appzoo.latent_diffusion.data import preprocess_image  # noqa: E402
from appzoo.latent_diffusion.losses import DiffusionObjective  # noqa: E402
from appzoo.latent_diffusion.params import default_params  # noqa: E402
from appzoo.latent_diffusion.pipeline import LatentDiffusionPipeline  # noqa: E402
from modelzoo.ldm import LatentDiffusion  # noqa: E402
from modelzoo.pretrained import DEFAULT_MODEL, embedded_models  # noqa: E402
from shapes_data.generate import (  # noqa: E402
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOURS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPES,
    caption,
    render,
    sample_spec,
)
from shapes_data.judge import judge  # noqa: E402


def probe(model: LatentDiffusion, folder: str, tag: str) -> None:
    """Judge 72 generated images for position, size, colour and shape."""
    model.eval()
    model.save_pretrained(folder)
    pipe = LatentDiffusionPipeline(folder, default_params(n_samples=2, optimize="torch"), batch_size=36)
    rng = random.Random(11)
    prompts, truth = [], []
    for position in POSITIONS:
        for size in ("大", "小"):
            c, s, b = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
            prompts.append(f"{b}背景，{POSITION_PHRASES[position][0]}有一个{size}的{c}{s}")
            truth.append((position, size, c, s))
    records = pipe(prompts)
    right = {"position": 0, "size": 0, "colour": 0, "shape": 0}
    for record in records:
        verdict, (position, size, c, s) = judge(record["image"]), truth[record["idx"]]
        right["position"] += verdict.position == position
        right["size"] += verdict.size == size
        right["colour"] += verdict.colour == c
        right["shape"] += verdict.shape == s
    print(tag, {k: f"{100 * v / len(records):.0f}%" for k, v in right.items()}, flush=True)
    model.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--probe", type=int, default=300)
    parser.add_argument("--t_min", type=int, default=900)
    parser.add_argument("--high_frac", type=float, default=0.5)
    parser.add_argument("--wmax", type=float, default=1000.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--examples", type=int, default=6000)
    parser.add_argument("--out", default="/tmp/position_finetune")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = LatentDiffusion.from_pretrained(args.model or embedded_models()[DEFAULT_MODEL]).float()
    objective = DiffusionObjective(model)
    rng = random.Random(5)
    with_position = [i for i, t in enumerate(CAPTION_TEMPLATES) if "{p}" in t]
    specs = [sample_spec(rng) for _ in range(args.examples)]
    captions = [caption(s, rng, template=rng.choice(with_position) if rng.random() < 0.8 else None) for s in specs]
    with torch.no_grad():
        latents = torch.cat([
            model.vae.encode(torch.stack([preprocess_image(render(s), (64, 64)) for s in specs[i:i + 128]]))
            .latent_dist.mean * model.vae_scaling_factor for i in range(0, len(specs), 128)])
    probe(model, args.out + "_probe", "step 0")
    params = list(model.unet.parameters()) + list(model.text_encoder.parameters())
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    model.train()
    g = torch.Generator().manual_seed(1)
    drop = random.Random(2)
    start = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(specs), (args.batch,), generator=g)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        high = torch.rand(args.batch, generator=g) < args.high_frac
        t = torch.where(high, torch.randint(args.t_min, 1000, (args.batch,), generator=g),
                        torch.randint(0, 1000, (args.batch,), generator=g))
        embeds = model.encode_prompts([captions[i] if drop.random() > 0.1 else "" for i in idx.tolist()])
        loss = objective.per_sample_loss(x0, noise, t, embeds, min_snr=False)
        snr = compute_snr(objective.scheduler, t)
        weights = torch.where(high, (1 / snr).clamp(1, args.wmax), torch.ones_like(snr))
        (loss * weights / weights.mean()).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        optimiser.zero_grad()
        if step % args.probe == 0:
            print(f"{(time.time() - start) / step:.2f} s/step", flush=True)
            probe(model, args.out + "_probe", f"step {step}")
    model.save_pretrained(args.out)


if __name__ == "__main__":
    main()
