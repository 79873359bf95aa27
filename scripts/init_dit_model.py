"""Create the randomly initialised Z-Image-layout folder that scripts/train_dit_model.sh trains into shapes-dit-zh: a
diffusers folder that ``ZImagePipeline.from_pretrained`` loads and this toolkit reads as the zimage family.

- ``ZImageTransformer2DModel`` over the shipped VAE's 4 latent channels (64×64 images → 16×16 latents; patch 2 → 64
  image tokens), its RoPE head split ``axes_dims`` (caption/frame axis, height, width) summing to the head dimension;
- a small ``Qwen3Model`` caption encoder, trained from scratch with the transformer. ZImagePipeline reads its
  second-to-last hidden state, so its last layer is never used: ``--text_layers`` counts the layers that work, one
  more is built;
- a byte-level BPE tokenizer (modelzoo/tiny_dit.py's builder, Qwen's chat template) whose merges are learnt from the
  captions' characters one at a time, so every character is one token and no word is (a merged "蓝色圆形" would
  make every colour × shape pair its own token, and held-out pairs unreachable); "user" and "assistant" are whole
  tokens so the chat template costs 10 tokens. Characters never seen fall back to their UTF-8 bytes;
- the VAE of an SD-1.x model (default: the embedded shapes-ldm-zh), ``shift_factor`` 0 (ZImagePipeline adds it);
- ``FlowMatchEulerDiscreteScheduler`` with a fixed ``shift`` (no resolution-dependent shift at 64 tokens);
- ``model_index.json``: ``_image_size`` 64 and ``_generation_defaults`` (steps, guidance) the model samples with.

    python scripts/init_dit_model.py --captions data/T2I_train.tsv --output DIR [--dim 128 --layers 4 ...]

The same arguments and seed write the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Whole tokens beside the captions' characters: the chat template's roles.
TEMPLATE_WORDS = ("user", "assistant")


def caption_characters(caption_files: list[str]) -> list[str]:
    """Every character of the captions (the second column of each TSV) and of the tests' tiny vocabulary, sorted."""
    from modelzoo.tiny import TINY_CHARS

    seen = set(TINY_CHARS)
    for path in caption_files:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                cells = line.rstrip("\n").split("\t")
                if len(cells) >= 2:
                    seen.update(ch for ch in cells[1] if not ch.isspace())
    return sorted(seen)


def character_tokenizer(caption_files: list[str]):
    """The tiny Qwen tokenizer with one token per caption character: each character is its own training text, so BPE
    learns the merges that rebuild a character from its bytes and none across characters."""
    from modelzoo.tiny_dit import make_tiny_tokenizer

    corpus = caption_characters(caption_files) + list(TEMPLATE_WORDS)
    # 256 bytes + Qwen's special tokens + at most one merge per byte of the corpus: every merge it can learn.
    return make_tiny_tokenizer(vocab_size=512 + sum(len(text.encode("utf-8")) for text in corpus), corpus=corpus)


def axes_split(head_dim: int) -> list[int]:
    """RoPE dimensions per axis (caption/frame, height, width), even and summing to ``head_dim``: the two image axes
    share three quarters, as Z-Image's own (32, 48, 48) of 128."""
    spatial = (head_dim * 3 // 8) // 2 * 2
    return [head_dim - 2 * spatial, spatial, spatial]


def build_pipeline(args):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from modelzoo import families
    from modelzoo.pretrained import embedded_models

    tokenizer = character_tokenizer(args.captions)
    vae = families.load(embedded_models().get(args.vae, args.vae)).vae.float()
    vae.register_to_config(shift_factor=0.0)  # ZImagePipeline decodes latents / scaling_factor + shift_factor
    torch.manual_seed(args.seed)
    head_dim = args.dim // args.heads
    transformer = ZImageTransformer2DModel(
        all_patch_size=(args.patch,), all_f_patch_size=(1,), in_channels=vae.config.latent_channels, dim=args.dim,
        n_layers=args.layers, n_refiner_layers=args.refiner_layers, n_heads=args.heads, n_kv_heads=args.heads,
        norm_eps=1e-5, qk_norm=True, cap_feat_dim=args.text_hidden, rope_theta=256.0, t_scale=1000.0,
        axes_dims=axes_split(head_dim),
        # caption positions (padded to a multiple of 32, then the image's frame index) and the latent grid
        axes_lens=[2 * args.text_length + 32, 64, 64])
    with torch.no_grad():  # created with torch.empty: the tokens that pad the caption (and image) to multiples of 32
        transformer.x_pad_token.normal_(0.0, 0.02)
        transformer.cap_pad_token.normal_(0.0, 0.02)
    text_heads = max(1, args.text_hidden // 16)
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=args.text_hidden, intermediate_size=2 * args.text_hidden, num_hidden_layers=args.text_layers + 1,
        num_attention_heads=text_heads, num_key_value_heads=text_heads, head_dim=args.text_hidden // text_heads,
        vocab_size=len(tokenizer), max_position_embeddings=args.text_length, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False)).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=args.shift, use_dynamic_shifting=False)
    return ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", nargs="+", required=True, help="TSV files whose second column is a caption")
    parser.add_argument("--output", required=True, help="a new (or empty) folder")
    parser.add_argument("--vae", default="shapes-ldm-zh", help="the SD-1.x model (name or folder) whose VAE is used")
    parser.add_argument("--dim", type=int, default=128, help="transformer width")
    parser.add_argument("--layers", type=int, default=4, help="joint (caption + image) transformer blocks")
    parser.add_argument("--refiner_layers", type=int, default=1, help="blocks over the image / caption tokens alone")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--patch", type=int, default=2, help="latent pixels per token side (16×16 latents)")
    parser.add_argument("--text_hidden", type=int, default=64, help="caption encoder width (heads of 16)")
    parser.add_argument("--text_layers", type=int, default=1, help="caption encoder layers whose output is read")
    parser.add_argument("--text_length", type=int, default=64,
                        help="tokens a prompt is cut to, chat template (10) included")
    parser.add_argument("--shift", type=float, default=3.0,
                        help="the schedule's time shift, of sampling and of the training timesteps (the probes: 3 "
                             "learns faster than 1)")
    parser.add_argument("--steps", type=int, default=10, help="_generation_defaults: num_inference_steps")
    parser.add_argument("--guidance", type=float, default=2.0,
                        help="_generation_defaults: guidance_scale (Z-Image's rule: 0 is unguided; the trained model's "
                             "evaluation: 2 beats unguided on every attribute, most on held-out shapes, and 10 steps "
                             "equal 20)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.dim % args.heads or (args.dim // args.heads) % 8:
        parser.error("--dim / --heads must be a multiple of 8 (the RoPE axes split the head dimension)")
    if 16 % args.patch:
        parser.error("--patch must divide the 16×16 latent grid")

    from easynlp_ldm.files import atomic_folder, atomic_write_text
    from modelzoo.families.dit_defaults import INDEX_KEY

    pipe = build_pipeline(args)
    with atomic_folder(args.output) as staging:
        pipe.save_pretrained(staging)
        index_path = os.path.join(staging, "model_index.json")
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        index["_image_size"] = int(pipe.vae.config.sample_size)
        index[INDEX_KEY] = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
        atomic_write_text(index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters())
              for name in ("transformer", "text_encoder", "vae")}
    print(f"wrote {args.output}: " + ", ".join(f"{name} {count / 1e6:.2f} M" for name, count in counts.items())
          + f", vocabulary {len(pipe.tokenizer)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
