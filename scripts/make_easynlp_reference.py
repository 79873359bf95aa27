"""Generate tests/data/easynlp/: a tiny latent_diffusion checkpoint written the way EasyNLP's trainer writes it, and
reference tensors computed by EasyNLP's own model code. Not run in CI; the committed files are its output.

It needs a scratch virtual environment with EasyNLP's model dependencies only (no CUDA torch):

    python3 -m venv /tmp/easynlp-venv
    /tmp/easynlp-venv/bin/pip install torch==2.13.0      # the CPU build, first
    /tmp/easynlp-venv/bin/pip install numpy einops pillow pyyaml six tqdm safetensors
    /tmp/easynlp-venv/bin/python scripts/make_easynlp_reference.py \
        --easynlp-git /work/.mirror/alibaba+EasyNLP/repo --out tests/data/easynlp

``--check FOLDER`` instead loads a folder this toolkit wrote (``export_format=easynlp``) into EasyNLP's classes,
strictly, and prints the differences of its outputs from the reference:

    /tmp/easynlp-venv/bin/python scripts/make_easynlp_reference.py --check EXPORTED_FOLDER

EasyNLP's package as a whole does not import without its many dependencies, so the script copies just its
latent_diffusion model files (and the Wukong text transformer) from the repository (``git show REV:path``) into a
temporary package and patches only import lines (relative imports of the wider package, and torchvision's
``make_grid``, used only for logging images).

Outputs (``--out``):
* ``config.json`` — the CompVis config EasyNLP reads (``{"model": {"target", "params": ...}}``, tiny sizes);
* ``vocab.txt`` — a 128-entry BERT vocabulary ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103);
* ``pytorch_model.bin`` — ``LatentDiffusionModel.state_dict()`` (what the trainer saves with
  ``reset_model_state_flag``), with EMA weights (``model_ema.*``) that differ from the live weights;
  (the trainer without the flag writes the same keys each prefixed ``model.``; the tests derive that file);
* ``reference.safetensors`` — inputs and EasyNLP's outputs: ``prompt_ids`` (EasyNLP's tokenisation of PROMPTS,
  listed in the file's metadata), ``cond`` (``get_learned_conditioning``), ``latents``, ``timesteps``, ``eps``
  (``apply_model`` on the first BATCH conditionings under ``ema_scope``, i.e. with the EMA UNet), ``eps_live``
  (without EMA), ``decoded`` (``decode_first_stage``),
  ``images`` (``decode_first_stage`` then EasyNLP's clamp to [0, 1]), ``noise``/``noisy`` (``q_sample``),
  ``betas`` and ``alphas_cumprod``; ``plms_x_t``, ``plms_latents`` and ``plms_images``: EasyNLP's predictor's
  sampling (PLMS, 20 steps, scale 5, EMA weights) of the first two prompts from ``plms_x_t``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

PROMPTS = ["一只红色的圆", "blue square, Two Triangles!", "", "绿色三角形在左边" * 4,
           # Tokenisation edge cases: special tokens written as text, a word longer than transformers' 100-character
           # WordPiece limit (EasyNLP's is 200), accents, full-width forms, emoji, whitespace only.
           "[SEP] 与 [CLS] 字面 [PAD] [MASK]", "x" * 150 + " 红", "Café ÜNÏCÖDÉ ÀÉ", "ＡＢＣ！ ＃",
           "🙂 红色\t圆\n形", "  "]
BATCH = 4  # the UNet/VAE inputs use the first BATCH prompts

SRC = "easynlp/modelzoo/models/latent_diffusion"
FILES = ["ddpm", "openaimodel", "attention", "autoencoder", "model", "util", "distributions", "ema", "ddim",
         "quantize", "wukong", "x_transformer", "bert_tokenizer", "plms"]

VOCAB_WORDS = list("一只红色的圆蓝绿三角形在左边") + ["blue", "square", "two", "tri", "##ang", "##les", "!", ",",
                                                        "x", "##x"]

TEXT = {"context_length": 16, "vocab_size": 128, "output_dim": 16, "width": 32, "layers": 2, "heads": 2}

CONFIG = {"model": {
    "base_learning_rate": 1e-4,
    "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
    "params": {
        "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200,
        "timesteps": 1000, "first_stage_key": "image", "cond_stage_key": "caption", "image_size": 16,
        "channels": 4, "cond_stage_trainable": False, "conditioning_key": "crossattn",
        "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": True,
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32,
            "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1, 1], "num_heads": 2,
            "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 16, "use_checkpoint": False,
            "legacy": False}},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss",
            "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3,
                         "ch": 32, "ch_mult": [1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
            "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenWukongCLIPTextEmbedder", "params": {
            "text_encoder": TEXT, "max_length": 16, "n_repeat": 2, "normalize": True}},
    }}}


def vocab() -> list[str]:
    lines = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    lines += VOCAB_WORDS
    assert len(lines) == TEXT["vocab_size"], len(lines)
    return lines


def copy_sources(git_dir: str, rev: str, target: str) -> None:
    package = os.path.join(target, "easynlp_ref")
    os.makedirs(package)
    open(os.path.join(package, "__init__.py"), "w").close()

    def show(path: str) -> str:
        return subprocess.run(["git", "-C", git_dir, "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout

    for name in FILES:
        text = show(f"{SRC}/{name}.py")
        # Only import lines change: the Wukong text transformer is copied beside them; torchvision is not needed.
        text = text.replace("from ..wukong.configuration_wukong import WukongConfig\n", "")
        text = text.replace("from ..wukong.modeling_wukong import WukongModel,TextTransformer",
                            "from .modeling_wukong import TextTransformer")
        text = text.replace("from torchvision.utils import make_grid", "make_grid = None")
        with open(os.path.join(package, f"{name}.py"), "w") as handle:
            handle.write(text)
    wukong = show("easynlp/modelzoo/models/wukong/modeling_wukong.py")
    # Keep the module's imports and its transformer classes (the rest is Wukong's training script).
    start = wukong.index("class QuickGELU")
    end = wukong.index("class WukongModel")
    header = "from collections import OrderedDict\nimport numpy as np\nimport torch\nfrom torch import nn\n\n"
    with open(os.path.join(package, "modeling_wukong.py"), "w") as handle:
        handle.write(header + wukong[start:end])


def build_model(config: dict, folder: str):
    """EasyNLP's ``LatentDiffusionModel`` for ``config``, built as easynlp/appzoo/latent_diffusion/model.py does."""
    import copy

    from easynlp_ref.autoencoder import AutoencoderKL
    from easynlp_ref.ddpm import LatentDiffusionModel
    from easynlp_ref.wukong import FrozenWukongCLIPTextEmbedder

    params = copy.deepcopy(config["model"]["params"])
    params["first_stage_config"]["params"]["ckpt_path"] = None
    params["first_stage_model"] = AutoencoderKL(**params["first_stage_config"]["params"])
    params["cond_stage_config"]["params"]["version"] = folder
    params["cond_stage_model"] = FrozenWukongCLIPTextEmbedder(**params["cond_stage_config"]["params"])
    model = LatentDiffusionModel(**params).eval()
    model.cond_stage_model.device = "cpu"
    return model


def plms_sample(model, x_t):
    """EasyNLP's predictor's sampling (easynlp/appzoo/latent_diffusion/model.py forward_predict): PLMS, 20 steps,
    guidance scale 5 against the empty prompt, eta 0, under ``ema_scope``, for the first two PROMPTS from ``x_t``."""
    import torch
    from easynlp_ref.plms import PLMSSampler

    def register_buffer(self, name, value):  # PLMSSampler's own moves every buffer to CUDA
        setattr(self, name, value)

    PLMSSampler.register_buffer = register_buffer
    with torch.no_grad(), model.ema_scope():
        uc = model.get_learned_conditioning(len(x_t) * [""])
        c = model.get_learned_conditioning(PROMPTS[:len(x_t)])
        samples, _ = PLMSSampler(model).sample(S=20, conditioning=c, batch_size=len(x_t), shape=list(x_t.shape[1:]),
                                               verbose=False, unconditional_guidance_scale=5.0,
                                               unconditional_conditioning=uc, eta=0.0, x_T=x_t)
    return samples


def compute(model, latents, timesteps, noise, x_t) -> dict:
    """EasyNLP's outputs on the given inputs (see the module docstring)."""
    import torch

    embedder = model.cond_stage_model
    with torch.no_grad():
        cond = model.get_learned_conditioning(PROMPTS)
        eps_live = model.apply_model(latents, timesteps, cond[:BATCH])
        with model.ema_scope():
            eps = model.apply_model(latents, timesteps, cond[:BATCH])
        decoded = model.decode_first_stage(latents)
        images = torch.clamp((decoded + 1.0) / 2.0, min=0.0, max=1.0)
        noisy = model.q_sample(x_start=latents, t=timesteps, noise=noise)
        plms = plms_sample(model, x_t)
    return {"plms_x_t": x_t, "plms_latents": plms, "plms_images": torch.clamp((model.decode_first_stage(plms) + 1) / 2,
                                                                              min=0.0, max=1.0),
            "prompt_ids": embedder.tokenize(embedder.tokenizer, PROMPTS, context_length=embedder.max_length),
            "cond": cond, "latents": latents, "timesteps": timesteps, "eps": eps, "eps_live": eps_live,
            "decoded": decoded, "images": images, "noise": noise, "noisy": noisy, "betas": model.betas,
            "alphas_cumprod": model.alphas_cumprod}


def check(folder: str, reference: str) -> int:
    """Load ``folder`` (e.g. one this toolkit wrote) into EasyNLP's own classes as its app does, but strictly (every
    weight present, nothing unexpected), and print its outputs' largest differences from ``reference``."""
    import torch
    from safetensors.torch import load_file

    with open(os.path.join(folder, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    model = build_model(config, folder)
    state = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    ref = load_file(reference)
    ours = compute(model, ref["latents"], ref["timesteps"], ref["noise"], ref["plms_x_t"])
    for key in ("prompt_ids", "cond", "eps", "eps_live", "decoded", "noisy", "betas", "plms_latents", "plms_images"):
        print(f"{key}: max |difference| {float((ours[key].double() - ref[key].double()).abs().max()):.3g}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--easynlp-git", default="/work/.mirror/alibaba+EasyNLP/repo")
    parser.add_argument("--rev", default="HEAD")
    parser.add_argument("--out", default="tests/data/easynlp")
    parser.add_argument("--check", metavar="FOLDER", help="instead: load FOLDER in EasyNLP's classes (strictly) and "
                        "compare its outputs with --out's reference.safetensors")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    scratch = tempfile.mkdtemp(prefix="easynlp-ref-")
    copy_sources(args.easynlp_git, args.rev, scratch)
    sys.path.insert(0, scratch)
    if args.check:
        return check(args.check, os.path.join(out, "reference.safetensors"))
    os.makedirs(out, exist_ok=True)

    import numpy
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    numpy.random.seed(0)  # Wukong's TextTransformer draws text_projection from numpy
    with open(os.path.join(out, "vocab.txt"), "w", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in vocab()))
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(CONFIG, handle, ensure_ascii=False, indent=2)

    model = build_model(CONFIG, out)
    # Random weights of a realistic scale everywhere (zero-initialised output convs would hide mapping mistakes).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        # EMA weights that differ from the live ones.
        for buf in model.model_ema.buffers():
            if buf.is_floating_point() and buf.ndim > 0:
                buf.add_(torch.randn_like(buf) * 0.05)
        model.model_ema.num_updates.fill_(7)

    state = model.state_dict()
    torch.save(state, os.path.join(out, "pytorch_model.bin"))

    g = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, 4, 16, 16, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    x_t = torch.randn(2, *latents.shape[1:], generator=g)
    tensors = compute(model, latents, torch.tensor([0, 250, 600, 999]), noise, x_t)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, os.path.join(out, "reference.safetensors"),
              metadata={"prompts": json.dumps(PROMPTS, ensure_ascii=False)})
    ids = tensors["prompt_ids"]
    print("wrote", out, "keys", len(state), "prompt ids", ids.tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
