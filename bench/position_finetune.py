"""Issue 19's second experiment: fine-tune the shipped model on all nine cells with half of each batch at the noisiest
timesteps and the loss on the predicted clean latents (weight 1/SNR, capped at --wmax, on the epsilon loss), the
other half the usual epsilon loss; every --probe steps generate 72 images (9 positions × 2 sizes, 2 samples each,
"<background>背景，<position>有一个<size>的<colour><shape>", 20 steps, guidance 5) and judge them from pixels.

    python bench/position_finetune.py [--steps 1500] [--probe 300] [--t_min 900] [--high_frac 0.5] [--wmax 1000]
                                      [--lr 2e-4] [--examples 6000] [--out /tmp/position_finetune]

    python bench/position_finetune.py --steps 3200 --probe 400 --fresh --balanced --ema 0.998 --position_frac 0.7 \
        --out /tmp/run1          # the third run (stopped at step 2 000): size learnt, position not

Measured (2 cores, fp32, 1.5 s/step for the defaults, 1.1 s/step for the third run): see
docs/embedded_model_research.md, "What is known about size and position".
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
from appzoo.latent_diffusion.params import default_params  # noqa: E402
from appzoo.latent_diffusion.pipeline import LatentDiffusionPipeline  # noqa: E402
from modelzoo.families import sd
from modelzoo.ldm import LatentDiffusion  # noqa: E402
from modelzoo.objectives import DiffusionObjective  # noqa: E402
from modelzoo.pretrained import DEFAULT_MODEL, embedded_models  # noqa: E402
from shapes_data.generate import (  # noqa: E402
    BACKGROUNDS,
    CAPTION_TEMPLATES,
    COLOURS,
    HELDOUT_PAIRS,
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
    sd.save(model, folder)
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
    parser.add_argument("--position_frac", type=float, default=0.8, help="share of captions that state the position")
    parser.add_argument("--fresh", action="store_true",
                        help="draw, render and encode new examples for every batch (never the held-out pairs) "
                             "instead of a fixed set of --examples")
    parser.add_argument("--balanced", action="store_true",
                        help="weigh the two halves separately (each normalised to its own mean weight, the usual "
                             "half with Min-SNR 5) so that the x0 half does not drown the epsilon half")
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the probed and saved weights (0: none)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = sd.load(args.model or embedded_models()[DEFAULT_MODEL]).float()
    objective = DiffusionObjective(model)
    rng = random.Random(5)
    with_position = [i for i, t in enumerate(CAPTION_TEMPLATES) if "{p}" in t]
    seen = (lambda c, s: (c, s) not in HELDOUT_PAIRS) if args.fresh else None

    def draw(count: int) -> tuple[list[str], torch.Tensor]:
        specs = [sample_spec(rng, pairs_allowed=seen) for _ in range(count)]
        texts = [caption(s, rng, template=rng.choice(with_position) if rng.random() < args.position_frac else None)
                 for s in specs]
        with torch.no_grad():
            encoded = torch.cat([
                model.vae.encode(torch.stack([preprocess_image(render(s), (64, 64)) for s in specs[i:i + 128]]))
                .latent_dist.mean * model.vae_scaling_factor for i in range(0, len(specs), 128)])
        return texts, encoded

    if not args.fresh:
        captions, latents = draw(args.examples)
    trained = [*model.unet.parameters(), *model.text_encoder.parameters()]
    averaged = [p.detach().clone() for p in trained] if args.ema else None

    def probe_averaged(tag: str) -> None:
        if averaged is None:
            return probe(model, args.out + "_probe", tag)
        current = [p.detach().clone() for p in trained]
        with torch.no_grad():
            for p, a in zip(trained, averaged):
                p.copy_(a)
        probe(model, args.out + "_probe", tag)
        sd.save(model, args.out)
        with torch.no_grad():
            for p, c in zip(trained, current):
                p.copy_(c)

    probe(model, args.out + "_probe", "step 0")
    params = trained
    optimiser = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    model.train()
    g = torch.Generator().manual_seed(1)
    drop = random.Random(2)
    start = time.time()
    for step in range(1, args.steps + 1):
        if args.fresh:
            texts, x0 = draw(args.batch)
        else:
            idx = torch.randint(0, len(captions), (args.batch,), generator=g)
            texts, x0 = [captions[i] for i in idx.tolist()], latents[idx]
        noise = torch.randn(x0.shape, generator=g)
        high = torch.rand(args.batch, generator=g) < args.high_frac
        t = torch.where(high, torch.randint(args.t_min, 1000, (args.batch,), generator=g),
                        torch.randint(0, 1000, (args.batch,), generator=g))
        embeds = model.encode_prompts([text if drop.random() > 0.1 else "" for text in texts])
        loss = objective.per_sample_loss(x0, noise, t, embeds, min_snr=False)
        snr = compute_snr(objective.scheduler, t)
        if args.balanced:
            usual = snr.clamp(max=5.0) / snr  # Min-SNR 5, as the shipped model was trained
            x0_weight = (1 / snr).clamp(1, args.wmax)
            high_part = (loss * x0_weight)[high].sum() / x0_weight[high].sum().clamp(min=1e-8)
            low_part = (loss * usual)[~high].sum() / usual[~high].sum().clamp(min=1e-8)
            (high_part + low_part).backward()
        else:
            weights = torch.where(high, (1 / snr).clamp(1, args.wmax), torch.ones_like(snr))
            (loss * weights / weights.mean()).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        optimiser.zero_grad()
        if averaged is not None:
            with torch.no_grad():
                for p, a in zip(trained, averaged):
                    a.lerp_(p.detach(), 1 - args.ema)
        if step % args.probe == 0:
            print(f"{(time.time() - start) / step:.2f} s/step", flush=True)
            probe_averaged(f"step {step}")
    if averaged is None:
        sd.save(model, args.out)


if __name__ == "__main__":
    main()
