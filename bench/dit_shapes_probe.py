"""Issue 33's cheap measurements before the long rebuild: how fast does a small Z-Image-layout model, trained from
scratch on the shapes data, learn to follow colour, shape, background, size and position?

A randomly initialised folder (scripts/init_dit_model.py: its arguments are the design — patch, depth, width, caption
encoder, text length, time shift) is trained here by a short loop of its own: batch --batch of the training table's
VAE latents (the posterior means, cached beside the data), the caption encoder trained jointly with the transformer
(--caption_dropout of the captions empty, as the toolkit trains), the family's flow-matching objective
(modelzoo/objectives.py: diffusers' timestep density --weighting_scheme and loss weighting), AdamW with a linear
warm-up, bf16 autocast. Every --probe steps (and at the end) it generates one
image per prompt for the first --prompts test prompts that state a position — through the toolkit's own generation
step, seeded as --mode=evaluate seeds them (random seed 0), with each --sampling steps×guidance — and judges them
with the pixel judge (shapes_data/scoring.py), and it measures the fixed-noise validation loss (256 validation rows).
One line per probe: steps, training minutes (probes excluded), loss, validation loss, each attribute's accuracy.

    python scripts/make_shapes_dataset.py --output_dir /tmp/dshapes --seed 0
    python scripts/init_dit_model.py --captions /tmp/dshapes/T2I_train.tsv --output /tmp/dit_init
    python bench/dit_shapes_probe.py --init /tmp/dit_init [--data /tmp/dshapes] [--minutes 10] [--probe 100]
        [--lr 1e-3] [--weighting_scheme none|logit_normal] [--sampling 8x0,20x0] [--prompts 90] [--jsonl OUT]

Measured (2 shared cores): see docs/embedded_model_research.md, "shapes-dit-zh: the DiT's design measurements".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from appzoo.latent_diffusion.data import preprocess_image  # noqa: E402
from appzoo.latent_diffusion.generation import Generator, image_seed  # noqa: E402
from appzoo.latent_diffusion.settings import GenerationSettings  # noqa: E402
from easynlp_ldm.files import atomic_write_bytes  # noqa: E402
from easynlp_ldm.tables import decode_image_base64  # noqa: E402
from modelzoo import families  # noqa: E402
from modelzoo.objectives import fixed_noise_flow_loss  # noqa: E402
from shapes_data.generate import parse_caption  # noqa: E402
from shapes_data.judge import AccuracyCounter, judge  # noqa: E402
from shapes_data.scoring import ATTRIBUTES, judge_prompt, load_truth_by_idx, stated_attributes  # noqa: E402

VALIDATION_ROWS = 256
PROBE_SEED = 0  # evaluate's default --random_seed


def read_rows(path: str) -> list[list[str]]:
    with open(path, encoding="utf-8") as handle:
        return [line.rstrip("\n").split("\t") for line in handle if line.strip()]


@torch.no_grad()
def latent_moments(model, table: str, batch: int = 256) -> torch.Tensor:
    """The VAE posterior's (mean, logvar) of every image of ``table``, cached beside it (safetensors), keyed by the
    table and the VAE's weights."""
    from safetensors.torch import load_file, save

    family = families.family_of(model)
    key = hashlib.sha256(repr((os.path.abspath(table), os.path.getsize(table), os.path.getmtime(table),
                               [(k, float(v.double().sum())) for k, v in model.vae.state_dict().items()]))
                         .encode()).hexdigest()[:16]
    path = f"{os.path.splitext(table)[0]}.moments-{key}.safetensors"
    if os.path.isfile(path):
        return load_file(path)["moments"]
    rows, parts = read_rows(table), []
    for start in range(0, len(rows), batch):
        pixels = torch.stack([preprocess_image(decode_image_base64(row[2]), model.image_size)
                              for row in rows[start:start + batch]])
        parts.append(family.vae_moments(model, pixels.to(model.vae.dtype)).float())
    moments = torch.cat(parts)
    atomic_write_bytes(path, save({"moments": moments.contiguous()}))
    return moments


def tokenized(tokenizer, captions: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention masks of the captions in the chat template ZImagePipeline wraps a prompt in."""
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=True) for caption in captions]
    tokens = tokenizer(texts, padding="longest", max_length=length, truncation=True, return_tensors="pt")
    return tokens.input_ids, tokens.attention_mask


def caption_embeddings(text_encoder, ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """One (tokens, width) embedding per caption, as ZImagePipeline encodes a prompt (the second-to-last hidden
    state at the unpadded tokens), with gradients."""
    hidden = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    return [states[keep] for states, keep in zip(hidden, mask.bool())]


def probe_rows(table: str, count: int) -> list[tuple[int, str, str]]:
    """(line number, idx, prompt) of the first ``count`` rows of ``table`` whose prompt states a position."""
    chosen = []
    for number, row in enumerate(read_rows(table), start=1):
        if parse_caption(row[1]).get("position") is not None:
            chosen.append((number, row[0], row[1]))
        if len(chosen) == count:
            break
    return chosen


@torch.no_grad()
def prompt_following(model, rows, truth: dict, steps: int, guidance: float, text_length: int) -> dict:
    """Accuracy per attribute (shapes_data.scoring's keys) of one image per row, seeded as evaluate seeds it."""
    generator = Generator(model, GenerationSettings(steps=steps, guidance_scale=guidance), text_length)
    counter = AccuracyCounter(ATTRIBUTES, per_attribute_n=True)
    for start in range(0, len(rows), 30):
        batch = rows[start:start + 30]
        images = generator([prompt for _, _, prompt in batch],
                           [image_seed(PROBE_SEED, number, 0) for number, _, _ in batch])
        for (_, idx, prompt), image in zip(batch, images):
            counter.add("all", **judge_prompt(judge(image), stated_attributes(prompt, truth[idx], idx)))
    return counter.group("all")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--init", required=True, help="a folder from scripts/init_dit_model.py")
    parser.add_argument("--data", default="/tmp/dshapes", help="make_shapes_dataset.py's output folder")
    parser.add_argument("--minutes", type=float, default=10.0, help="training time (probes excluded)")
    parser.add_argument("--max_steps", type=int, default=0, help="stop after this many steps too (0: no limit)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--weighting_scheme", default="none", choices=("none", "logit_normal", "mode", "sigma_sqrt",
                                                                      "cosmap"))
    parser.add_argument("--logit_mean", type=float, default=0.0)
    parser.add_argument("--logit_std", type=float, default=1.0)
    parser.add_argument("--caption_dropout", type=float, default=0.1,
                        help="share of samples trained on the empty caption (the toolkit's default; guidance needs it)")
    parser.add_argument("--probe", type=int, default=100, help="probe every this many steps")
    parser.add_argument("--prompts", type=int, default=90, help="test prompts stating a position, judged per probe")
    parser.add_argument("--sampling", default="8x0", help="comma-separated STEPSxGUIDANCE settings probed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads: 1 on a shared machine (2 threads on 2 busy cores wait on each other)")
    parser.add_argument("--jsonl", default="", help="append one JSON object per probe here")
    parser.add_argument("--save", default="", help="write the trained model here (a diffusers folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sampling = [(int(steps), float(guidance)) for steps, guidance in
                (item.split("x") for item in args.sampling.split(","))]

    model = families.load(args.init, torch.float32)
    family = families.family_of(model)
    text_length = model.text_max_length
    train_moments = latent_moments(model, os.path.join(args.data, "T2I_train.tsv"))
    train_ids, train_mask = tokenized(model.tokenizer, [row[1] for row in read_rows(
        os.path.join(args.data, "T2I_train.tsv"))], text_length)
    empty_ids, empty_mask = tokenized(model.tokenizer, [""], text_length)
    width = train_ids.shape[1]
    empty_ids = torch.nn.functional.pad(empty_ids, (0, width - empty_ids.shape[1]), value=model.tokenizer.pad_token_id)
    empty_mask = torch.nn.functional.pad(empty_mask, (0, width - empty_mask.shape[1]))
    val_rows = read_rows(os.path.join(args.data, "T2I_val.tsv"))[:VALIDATION_ROWS]
    val_moments = latent_moments(model, os.path.join(args.data, "T2I_val.tsv"))[:VALIDATION_ROWS]
    val_ids, val_mask = tokenized(model.tokenizer, [row[1] for row in val_rows], text_length)
    test_table = os.path.join(args.data, "T2I_test.tsv")
    rows = probe_rows(test_table, args.prompts)
    truth = load_truth_by_idx(os.path.splitext(test_table)[0] + ".truth.jsonl")
    objective = family.objective(model, weighting_scheme=args.weighting_scheme, logit_mean=args.logit_mean,
                                 logit_std=args.logit_std)
    parameters = [p for module in (model.transformer, model.text_encoder) for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=args.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / args.warmup))
    generator = torch.Generator().manual_seed(args.seed)
    print(f"design: {args.init}; transformer {sum(p.numel() for p in model.transformer.parameters()) / 1e6:.2f} M, "
          f"caption encoder {sum(p.numel() for p in model.text_encoder.parameters()) / 1e6:.2f} M; "
          f"{len(train_ids)} training rows, text {train_ids.shape[1]} tokens; {vars(args)}", flush=True)

    def probe(step: int, trained_s: float, losses: list[float]) -> None:
        model.eval()
        with torch.no_grad():
            val_loss = fixed_noise_flow_loss(model, caption_embeddings(model.text_encoder, val_ids, val_mask),
                                             val_moments)
        for steps, guidance in sampling:
            acc = prompt_following(model, rows, truth, steps, guidance, text_length)
            record = dict(step=step, train_min=round(trained_s / 60, 2), loss=round(sum(losses) / max(1, len(losses)),
                                                                                     4),
                          val_loss=round(val_loss, 4), sampling=f"{steps}x{guidance:g}",
                          **{a: round(acc[f"{a}_acc"], 3) for a in ATTRIBUTES}, n=acc["n"],
                          size_n=acc["size_n"], background_n=acc["background_n"])
            print(json.dumps(record, ensure_ascii=False), flush=True)
            if args.jsonl:
                with open(args.jsonl, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(dict(record, design=args.init, lr=args.lr,
                                                 weighting_scheme=args.weighting_scheme)) + "\n")
        model.transformer.train()
        model.text_encoder.train()

    model.transformer.train()
    model.text_encoder.train()
    trained_s, step, losses = 0.0, 0, []
    while trained_s < args.minutes * 60 and not (args.max_steps and step >= args.max_steps):
        started = time.perf_counter()
        batch = torch.randint(len(train_ids), (args.batch,), generator=generator)
        mean, logvar = torch.chunk(train_moments[batch], 2, dim=1)
        latents = family.training_latents(model, mean, logvar, None)
        noise = torch.randn(latents.shape, generator=generator)
        indices = torch.tensor([objective.draw_index(generator) for _ in range(args.batch)])
        dropped = (torch.rand(args.batch, generator=generator) < args.caption_dropout).unsqueeze(1)
        ids = torch.where(dropped, empty_ids, train_ids[batch])
        mask = torch.where(dropped, empty_mask, train_mask[batch])
        length = int(mask.sum(dim=1).max())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            texts = caption_embeddings(model.text_encoder, ids[:, :length], mask[:, :length])
            loss = objective.loss(latents, noise, indices, texts)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        step += 1
        trained_s += time.perf_counter() - started
        if step % args.probe == 0:
            probe(step, trained_s, losses)
            losses = []
    if step % args.probe:
        probe(step, trained_s, losses)
    print(f"{step} steps in {trained_s / 60:.1f} min: {trained_s / max(1, step):.2f} s/step", flush=True)
    if args.save:
        families.save(model, args.save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
