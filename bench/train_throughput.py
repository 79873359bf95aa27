"""Training throughput: this toolkit's trainer vs a plain diffusers-style loop, same model, same data, one run.

Baseline: the loop of diffusers' train_text_to_image example reduced to its core — every step decodes nothing (the
images are pre-decoded tensors, to favour the baseline), encodes the batch with the VAE, samples noise and
timesteps, encodes the captions, runs the UNet in fp32, MSE, backward, AdamW.
Ours: ``easynlp --mode=train`` with ``--use_amp`` (bf16 autocast on CPU) and ``cache_latents=True`` (default),
whole command timed: reading the TSV, decoding and caching latents, training, checkpoint at the end.

    python bench/train_throughput.py [--rows 256] [--batch 32] [--epochs 3] [--preset configs/shapes_ldm_small.json]
    python bench/train_throughput.py --preset configs/pai_diffusion_arch.json --rows 24 --batch 4 --epochs 2

The first is the embedded model's size (64², 9 M-parameter UNet: overhead-bound, the VAE is a small part of a
step); the second PAI-Diffusion's architecture at 256² (SD-1.x layout, UNet width halved to fit 24 GB), where the
VAE encode and fp32 matrix products dominate as they do in real fine-tuning. Images are generated at the preset's
``image_size``. Prints images/s for both and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from appzoo.latent_diffusion.data import preprocess_image  # noqa: E402
from easynlp_ldm.tables import parse_schema, read_table  # noqa: E402
from modelzoo.families import sd  # noqa: E402
from modelzoo.presets import build_from_preset  # noqa: E402
from modelzoo.tiny import write_vocab  # noqa: E402
from shapes_data import generate_dataset  # noqa: E402


def baseline(model_dir: str, table: str, batch: int, epochs: int, lr: float) -> tuple[float, int]:
    from diffusers import DDPMScheduler

    start = time.perf_counter()
    model = sd.load(model_dir)
    rows = list(read_table(table, parse_schema("idx:str:1,text:str:1,imgbase64:str:1"), image_columns=["imgbase64"]))
    pixels = torch.stack([preprocess_image(r["imgbase64"], model.image_size) for r in rows])
    captions = [r["text"] for r in rows]
    scheduler = DDPMScheduler.from_config(model.scheduler_config)
    model.vae.requires_grad_(False)
    model.text_encoder.requires_grad_(False)
    model.unet.train()
    optimizer = torch.optim.AdamW(model.unet.parameters(), lr=lr)
    torch.manual_seed(0)
    images = 0
    for _ in range(epochs):
        order = torch.randperm(len(rows))
        for i in range(0, len(rows), batch):
            idx = order[i:i + batch]
            with torch.no_grad():
                latents = model.vae.encode(pixels[idx]).latent_dist.sample() * model.vae_scaling_factor
                embeds = model.encode_prompts([captions[j] for j in idx])
            noise = torch.randn_like(latents)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),))
            pred = model.unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=embeds).sample
            loss = F.mse_loss(pred, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            images += len(idx)
    return time.perf_counter() - start, images


def ours(model_dir: str, data: str, out: str, batch: int, epochs: int, lr: float) -> tuple[float, int]:
    from easynlp_ldm import cli

    os.environ["EASYNLP_PROGRESS"] = "0"
    start = time.perf_counter()
    code = cli.main(["--mode=train", f"--tables={os.path.join(data, 'T2I_train.tsv')}",
                     "--input_schema=idx:str:1,text:str:1,imgbase64:str:1", "--first_sequence=text",
                     "--second_sequence=imgbase64", f"--checkpoint_dir={out}", f"--micro_batch_size={batch}",
                     f"--epoch_num={epochs}", f"--learning_rate={lr}", "--use_amp", "--logging_steps=1000",
                     f"--user_defined_parameters=pretrain_model_name_or_path={model_dir}"])
    assert code == 0
    rows = sum(1 for _ in open(os.path.join(data, "T2I_train.tsv"), "rb"))
    return time.perf_counter() - start, rows * epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--preset", default=os.path.join(ROOT, "configs", "shapes_ldm_small.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        with open(args.preset, encoding="utf-8") as handle:
            image_size = int(json.load(handle).get("image_size", 64))
        generate_dataset(data, seed=0, num_train=args.rows, num_val=0, num_test=0, num_heldout=0,
                         image_size=image_size)
        vocab = os.path.join(tmp, "vocab.txt")
        write_vocab(vocab)
        model_dir = os.path.join(tmp, "model")
        model = build_from_preset(args.preset, vocab)
        sizes = {name: sum(p.numel() for p in getattr(model, name).parameters()) / 1e6
                 for name in ("text_encoder", "unet", "vae")}
        sd.save(model, model_dir)
        del model
        base_s, base_n = baseline(model_dir, os.path.join(data, "T2I_train.tsv"), args.batch, args.epochs, 1e-4)
        our_s, our_n = ours(model_dir, data, os.path.join(tmp, "out"), args.batch, args.epochs, 1e-4)
    base_ips, our_ips = base_n / base_s, our_n / our_s
    print(f"model preset: {os.path.relpath(args.preset, ROOT)} ({image_size}², parameters: "
          + ", ".join(f"{k} {v:.1f} M" for k, v in sizes.items())
          + f"); {args.rows} images, batch {args.batch}, {args.epochs} epochs, {torch.get_num_threads()} threads")
    print(f"baseline (diffusers-style loop, fp32, VAE every step): {base_n} images in {base_s:.1f} s = "
          f"{base_ips:.1f} images/s")
    print(f"easynlp --mode=train (bf16 autocast, cached latents, whole command): {our_n} images in {our_s:.1f} s "
          f"= {our_ips:.1f} images/s")
    print(f"ratio: {our_ips / base_ips:.2f}x")


if __name__ == "__main__":
    main()
