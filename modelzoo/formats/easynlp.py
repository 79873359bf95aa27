"""EasyNLP's own latent_diffusion checkpoint (``easynlp/appzoo/latent_diffusion``), read and written.

A folder holds ``config.json`` — the CompVis config ``{"model": {"target", "params": {linear_start, linear_end,
timesteps, scale_factor, image_size (latent), channels, conditioning_key, use_ema, unet_config,
first_stage_config, cond_stage_config}}}`` —, ``pytorch_model.bin`` (EasyNLP's ``LatentDiffusionModel``
state dict: ``model.diffusion_model.*`` the CompVis UNet, ``first_stage_model.*`` the VAE,
``cond_stage_model.model.*`` the Wukong text transformer, the schedule buffers, ``model_ema.*`` the EMA UNet
weights with the dots of their names removed (``LitEma``); every key prefixed once more with ``model.`` when the
trainer ran without ``reset_model_state_flag``), ``vocab.txt`` and ``RRDB_ESRGAN_x4.pth`` (fed BGR).
``pytorch_model.meta.bin`` and ``train_config.json`` beside them are EasyNLP's training state, not read.

Reading: the UNet and VAE become diffusers modules through diffusers' own CompVis converters (configs from
``create_*_diffusers_config_from_ldm``, key names from ``convert_ldm_*_checkpoint`` applied to tagged tensors, so
one mapping serves both directions); the EMA weights are used when the checkpoint has them and its config keeps
``use_ema`` (EasyNLP's predictor samples under ``ema_scope``); the Wukong transformer is
``modelzoo.text_encoder.WukongTextEncoder``; the noise schedule (CompVis ``linear`` = diffusers
``scaled_linear``) goes into a PLMS (``PNDMScheduler``) config, EasyNLP's sampler, with its 20 steps at
``image_size × VAE factor`` pixels (256² for PAI's models) as this toolkit's defaults already are.

Writing (``save``): the same files, unprefixed keys (what EasyNLP's ``LatentDiffusion`` loads). A model read from
an EasyNLP checkpoint keeps that checkpoint's config, and the tensors this toolkit does not hold (the live UNet
weights beside the EMA ones, ``model_ema.decay``/``num_updates``, any others) are taken from the source file while
the UNet is unchanged, so EasyNLP → this toolkit → EasyNLP is lossless; after fine-tuning the live and the EMA UNet
weights are both the fine-tuned ones. Any other model with a Wukong text encoder gets a config built from its
components (``use_ema`` false); other text encoders cannot be expressed (``NotExpressible``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)

from easynlp_ldm.files import load_state_dict_file
from modelzoo import text_encoder as te
from modelzoo.ldm import (
    CONFIG_NAME,
    VOCAB_NAME,
    WEIGHTS_NAME,
    LatentDiffusion,
    ModelFormatError,
    _esrgan_file,
    _load_strict,
    _read_json,
    write_checkpoint,
)

logger = logging.getLogger(__name__)

FORMAT = "easynlp"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."
EMA_STATE = ("model_ema.decay", "model_ema.num_updates")
WUKONG_TARGET = "FrozenWukongCLIPTextEmbedder"
SEP_TOKEN_ID = 102  # EasyNLP's TextTransformer pools at id 102, whatever the vocabulary says
SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear"}  # CompVis make_beta_schedule → diffusers
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2")


class NotExpressible(ModelFormatError):
    """A model that EasyNLP's format cannot hold; the message says why."""


# ------------------------------------------------------------------------------------------------ detection
def is_easynlp_checkpoint(path: str) -> bool:
    config = os.path.join(path, CONFIG_NAME)
    if not (os.path.isfile(config) and os.path.isfile(os.path.join(path, WEIGHTS_NAME))):
        return False
    try:
        with open(config, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("model"), dict) and "params" in data["model"]


def strip_model_prefix(state: dict) -> dict:
    """EasyNLP's trainer without ``reset_model_state_flag`` saves the application's state dict: every key
    ``model.``-prefixed once more. Returns the ``LatentDiffusionModel`` state dict either way."""
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if any(key.startswith("model." + UNET_PREFIX) for key in state):
        return {key[len("model."):] if key.startswith("model.") else key: value for key, value in state.items()}
    return dict(state)


def ema_name(ldm_unet_key: str) -> str:
    """``LitEma``'s buffer name for a UNet weight: its name under ``DiffusionWrapper`` without dots."""
    return EMA_PREFIX + ldm_unet_key[len("model."):].replace(".", "")


# --------------------------------------------------------------------------------------------- key mapping
_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _ldm_unet_name(key: str, config) -> str:
    """A CompVis UNet name for a diffusers UNet weight name: only to name the tags that diffusers' converter maps;
    the mapping itself is the converter's (``key_map`` checks it is one to one onto the diffusers names)."""
    per = config.layers_per_block + 1
    simple = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
              "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for new, old in simple.items():
        if key.startswith(new + "."):
            return UNET_PREFIX + old + key[len(new):]
    match = re.match(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)",
                     key)
    mid = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if mid:
        kind, index, rest = mid.groups()
        block = f"middle_block.{1 if kind == 'attentions' else 2 * int(index)}"
    elif match:
        where, b, kind, index, rest = match.groups()
        b, index = int(b), int(index)
        if where == "down_blocks":
            block = (f"input_blocks.{(b + 1) * per}.0.op" if kind == "downsamplers" else
                     f"input_blocks.{1 + b * per + index}.{1 if kind == 'attentions' else 0}")
            rest = rest[len("conv."):] if kind == "downsamplers" else rest
        else:
            has_attention = config.up_block_types[b].startswith("CrossAttn")
            block = (f"output_blocks.{b * per + per - 1}.{2 if has_attention else 1}" if kind == "upsamplers" else
                     f"output_blocks.{b * per + index}.{1 if kind == 'attentions' else 0}")
    else:
        raise NotExpressible(f"UNet weight {key} has no CompVis counterpart")
    if kind == "resnets":
        name, _, leaf = rest.rpartition(".")
        rest = f"{_RESNET_NAMES.get(name, name)}.{leaf}"
    return f"{UNET_PREFIX}{block}.{rest}"


def _ldm_vae_name(key: str, config) -> str:
    """A CompVis VAE name for a diffusers VAE weight name (see ``_ldm_unet_name``)."""
    levels = len(config.block_out_channels)
    rules = [(r"(encoder|decoder)\.conv_norm_out\.(.*)", lambda m: f"{m[1]}.norm_out.{m[2]}"),
             (r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
              lambda m: f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"),
             (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.*)",
              lambda m: f"encoder.down.{m[1]}.downsample.{m[2]}"),
             (r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)",
              lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"),
             (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.*)",
              lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"),
             (r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)",
              lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"),
             (r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)",
              lambda m: f"{m[1]}.mid.attn_1.{_VAE_ATTENTION.get(m[2], m[2])}.{m[3]}")]
    for pattern, build in rules:
        match = re.fullmatch(pattern, key)
        if match:
            key = build(match)
            break
    return VAE_PREFIX + key.replace("conv_shortcut", "nin_shortcut")


def key_map(module: torch.nn.Module, converter, name_of) -> dict[str, tuple[str, bool]]:
    """CompVis name → (diffusers name, squeezed) for every weight of ``module``, found by feeding diffusers'
    ``converter`` a checkpoint of integer tags under the CompVis names. ``squeezed``: the converter drops the
    trailing 1×1 dimensions of that weight (the VAE's attention convolutions)."""
    weights = module.state_dict()
    names = list(weights)
    ldm_names = [name_of(key, module.config) for key in names]
    # A matrix may be a 1×1 convolution on the CompVis side: its tag is 4-D, and the converter squeezes it if so.
    shapes = [(1,) * (4 if weights[key].ndim == 2 else weights[key].ndim) for key in names]
    tags = {name: torch.full(shape, index, dtype=torch.int64) for index, (name, shape) in
            enumerate(zip(ldm_names, shapes))}
    converted = converter(tags, dict(module.config))
    mapping = {}
    for key, tag in converted.items():
        index = int(tag.flatten()[0])
        mapping[ldm_names[index]] = (key, tag.ndim < len(shapes[index]))
    if len(mapping) != len(names) or {key for key, _ in mapping.values()} != set(names):
        raise NotExpressible(f"{type(module).__name__}: diffusers' CompVis converter does not map this model's "
                             "weights one to one (a layout EasyNLP's UNet/VAE cannot hold)")
    return mapping


def unet_key_map(unet: UNet2DConditionModel) -> dict[str, tuple[str, bool]]:
    return key_map(unet, convert_ldm_unet_checkpoint, _ldm_unet_name)


def vae_key_map(vae: AutoencoderKL) -> dict[str, tuple[str, bool]]:
    return key_map(vae, convert_ldm_vae_checkpoint, _ldm_vae_name)


# ------------------------------------------------------------------------------------------------- reading
def _check_readable(path: str, params: dict) -> None:
    cond = params.get("cond_stage_config")
    if params.get("conditioning_key", "crossattn") != "crossattn" or not isinstance(cond, dict) or \
            not str(cond.get("target", "")).endswith(WUKONG_TARGET):
        target = cond.get("target") if isinstance(cond, dict) else cond
        raise ModelFormatError(f"{path}: an EasyNLP latent_diffusion checkpoint this toolkit cannot read: only "
                               f"cross-attention conditioning by {WUKONG_TARGET} is supported (found "
                               f"{params.get('conditioning_key')!r}, {target!r})")
    if params.get("parameterization", "eps") != "eps":
        raise ModelFormatError(f"{path}: parameterization {params['parameterization']!r} (only eps is supported)")
    if params.get("beta_schedule", "linear") not in SCHEDULES:
        raise ModelFormatError(f"{path}: beta_schedule {params['beta_schedule']!r} (supported: "
                               f"{', '.join(SCHEDULES)})")


def _component(module: torch.nn.Module, mapping: dict, state: dict, ldm_key_of, where: str) -> None:
    converted = {}
    for ldm, (key, squeezed) in mapping.items():
        source = ldm_key_of(ldm)
        if source not in state:
            raise ModelFormatError(f"{where}: {source} missing")
        value = state[source]
        converted[key] = value.reshape(value.shape[:2]) if squeezed and value.ndim > 2 else value
    _load_strict(module, converted, where)


def scheduler_config(params: dict) -> dict:
    return {"_class_name": "PNDMScheduler", "num_train_timesteps": int(params.get("timesteps", 1000)),
            "beta_start": float(params.get("linear_start", 1e-4)), "beta_end": float(params.get("linear_end", 2e-2)),
            "beta_schedule": SCHEDULES[params.get("beta_schedule", "linear")], "trained_betas": None,
            "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
            "timestep_spacing": "leading"}


def load(path: str) -> LatentDiffusion:
    config = _read_json(os.path.join(path, CONFIG_NAME))
    params = config["model"]["params"]
    _check_readable(path, params)
    vocab = os.path.join(path, VOCAB_NAME)
    if not os.path.isfile(vocab):
        raise ModelFormatError(f"{path}: {VOCAB_NAME} missing")
    where = f"{path}/{WEIGHTS_NAME}"
    state = strip_model_prefix(load_state_dict_file(os.path.join(path, WEIGHTS_NAME)))

    unet_config = create_unet_diffusers_config_from_ldm(config, state)
    unet_config["sample_size"] = int(params.get("image_size", unet_config["sample_size"]))
    unet = UNet2DConditionModel.from_config(unet_config)
    unet_map = unet_key_map(unet)
    has_ema = any(ema_name(ldm) in state for ldm in unet_map)
    use_ema = bool(params.get("use_ema", True)) and has_ema
    if params.get("use_ema", True) and not has_ema:
        logger.warning("%s: use_ema is set but the checkpoint has no model_ema.* weights; using the UNet's own",
                       where)
    _component(unet, unet_map, state, ema_name if use_ema else (lambda ldm: ldm), f"{where} [UNet]")

    scale = state.get("scale_factor", params.get("scale_factor", 1.0))  # a buffer when scale_by_std was set
    vae_config = create_vae_diffusers_config_from_ldm(config, state, scaling_factor=float(scale))
    vae = AutoencoderKL.from_config(vae_config)
    _component(vae, vae_key_map(vae), state, lambda ldm: ldm, f"{where} [VAE]")
    image_size = unet_config["sample_size"] * 2 ** (len(vae.config.block_out_channels) - 1)
    vae.register_to_config(sample_size=image_size)

    cond = params["cond_stage_config"].get("params", {})
    text_config = {k: v for k, v in cond["text_encoder"].items() if k != "return_full_embed"}
    encoder = te.WukongTextEncoder(**text_config, n_repeat=int(cond.get("n_repeat", 1)),
                                   normalize=bool(cond.get("normalize", True)), sep_token_id=SEP_TOKEN_ID)
    _load_strict(encoder, {k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)},
                 f"{where} [text encoder]")
    tokenizer = te.load_tokenizer(vocab, te.wukong_tokenizer_settings(int(cond.get("max_length", 32))))
    if tokenizer.sep_token_id != SEP_TOKEN_ID:
        raise ModelFormatError(f"{vocab}: [SEP] is id {tokenizer.sep_token_id}; EasyNLP's text encoder pools at id "
                               f"{SEP_TOKEN_ID}")
    extra = {"source_format": FORMAT, "easynlp": {"config": config, "ema": use_ema}, "esrgan_channel_order": "bgr"}
    return LatentDiffusion(tokenizer, encoder, unet, vae, scheduler_config(params), image_size=image_size,
                           esrgan_path=_esrgan_file(path), extra=extra)


# ------------------------------------------------------------------------------------------------- writing
def schedule_buffers(params: dict) -> dict[str, torch.Tensor]:
    """EasyNLP's ``DDPM.register_schedule`` buffers, computed as it computes them (float64, then float32)."""
    steps = int(params.get("timesteps", 1000))
    start, end = float(params.get("linear_start", 1e-4)), float(params.get("linear_end", 2e-2))
    if params.get("beta_schedule", "linear") == "linear":
        betas = (torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2).numpy()
    else:
        betas = torch.linspace(start, end, steps, dtype=torch.float64).numpy()
    v_posterior = float(params.get("v_posterior", 0.0))
    alphas = 1.0 - betas
    cumprod = np.cumprod(alphas, axis=0)
    prev = np.append(1.0, cumprod[:-1])
    variance = (1 - v_posterior) * betas * (1.0 - prev) / (1.0 - cumprod) + v_posterior * betas
    values = (betas, cumprod, prev, np.sqrt(cumprod), np.sqrt(1.0 - cumprod), np.log(1.0 - cumprod),
              np.sqrt(1.0 / cumprod), np.sqrt(1.0 / cumprod - 1), variance, np.log(np.maximum(variance, 1e-20)),
              betas * np.sqrt(prev) / (1.0 - cumprod), (1.0 - prev) * np.sqrt(alphas) / (1.0 - cumprod))
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in zip(SCHEDULE_BUFFERS, values)}


def _check_writable(model: LatentDiffusion) -> None:
    encoder = model.text_encoder
    if not isinstance(encoder, te.WukongTextEncoder):
        raise NotExpressible(f"EasyNLP's latent_diffusion format conditions on its Wukong text transformer "
                             f"(pooled [SEP] output); this model's text encoder is a {type(encoder).__name__} "
                             f"(per-token hidden states), which that format cannot hold. Use export_format=tar "
                             f"or diffusers")
    if encoder.settings["sep_token_id"] != SEP_TOKEN_ID or model.tokenizer.sep_token_id != SEP_TOKEN_ID:
        raise NotExpressible(f"EasyNLP's text encoder pools at token id {SEP_TOKEN_ID}; this model's [SEP] is "
                             f"{model.tokenizer.sep_token_id}")
    scheduler = model.scheduler_config
    if scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise NotExpressible(f"EasyNLP's model predicts noise (eps); this one {scheduler['prediction_type']}")
    if scheduler.get("beta_schedule", "linear") not in SCHEDULES.values() or scheduler.get("trained_betas"):
        raise NotExpressible(f"noise schedule {scheduler.get('beta_schedule')!r} has no CompVis equivalent")


def build_config(model: LatentDiffusion) -> dict:
    """A CompVis config for a model that was not read from an EasyNLP checkpoint."""
    unet, vae, encoder = model.unet.config, model.vae.config, model.text_encoder.settings
    base = unet.block_out_channels[0]
    schedule = {value: key for key, value in SCHEDULES.items()}[model.scheduler_config.get("beta_schedule", "linear")]
    unet_params = {"image_size": int(unet.sample_size), "in_channels": unet.in_channels,
                   "out_channels": unet.out_channels, "model_channels": base,
                   "attention_resolutions": [2 ** i for i, kind in enumerate(unet.down_block_types)
                                             if kind.startswith("CrossAttn")],
                   "num_res_blocks": unet.layers_per_block,
                   "channel_mult": [c // base for c in unet.block_out_channels],
                   "num_heads": unet.attention_head_dim, "use_spatial_transformer": True,
                   "transformer_depth": unet.transformer_layers_per_block, "context_dim": unet.cross_attention_dim,
                   "use_checkpoint": True, "legacy": False}
    if unet.use_linear_projection:
        unet_params["use_linear_in_transformer"] = True
    vae_base = vae.block_out_channels[0]
    ddconfig = {"double_z": True, "z_channels": vae.latent_channels, "resolution": model.image_size,
                "in_channels": vae.in_channels, "out_ch": vae.out_channels, "ch": vae_base,
                "ch_mult": [c // vae_base for c in vae.block_out_channels], "num_res_blocks": vae.layers_per_block,
                "attn_resolutions": [], "dropout": 0.0}
    text = {key: encoder[key] for key in ("context_length", "vocab_size", "output_dim", "width", "layers", "heads")}
    params = {"linear_start": model.scheduler_config.get("beta_start", 1e-4),
              "linear_end": model.scheduler_config.get("beta_end", 2e-2), "beta_schedule": schedule,
              "num_timesteps_cond": 1, "log_every_t": 200,
              "timesteps": int(model.scheduler_config.get("num_train_timesteps", 1000)), "first_stage_key": "image",
              "cond_stage_key": "caption", "image_size": int(unet.sample_size), "channels": unet.in_channels,
              "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
              "scale_factor": float(vae.scaling_factor), "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                  "embed_dim": vae.latent_channels, "monitor": "val/rec_loss", "ddconfig": ddconfig,
                  "lossconfig": {"target": "torch.nn.Identity"}}},
              "cond_stage_config": {"target": f"ldm.modules.encoders.modules.{WUKONG_TARGET}", "params": {
                  "text_encoder": text, "max_length": model.text_max_length, "n_repeat": encoder["n_repeat"],
                  "normalize": encoder["normalize"]}}}
    config = {"model": {"base_learning_rate": 1e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                        "params": params}}
    # The config must describe exactly these modules: diffusers' own reading of it builds the same weights.
    for module, create in ((model.unet, create_unet_diffusers_config_from_ldm),
                           (model.vae, create_vae_diffusers_config_from_ldm)):
        rebuilt = type(module).from_config(create(config, {}))
        ours = {k: tuple(v.shape) for k, v in module.state_dict().items()}
        if ours != {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}:
            raise NotExpressible(f"this model's {type(module).__name__} has no CompVis config that EasyNLP's "
                                 "LatentDiffusionModel would build with the same weights")
    return config


def _source_state(model: LatentDiffusion) -> dict:
    """The source checkpoint's tensors, memory-mapped where torch can (a trainer saves often; only the tensors
    compared or copied are read)."""
    source = getattr(model, "source_path", None)
    if not source or not is_easynlp_checkpoint(source):
        return {}
    path = os.path.join(source, WEIGHTS_NAME)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not torch's zip format (mmap needs it), or anything load_state_dict_file reports better
        state = load_state_dict_file(path)
    if not isinstance(state, dict):
        state = load_state_dict_file(path)
    return strip_model_prefix(state)


def easynlp_state(model: LatentDiffusion, config: dict, overrides: dict | None = None) -> dict[str, torch.Tensor]:
    """EasyNLP's ``LatentDiffusionModel`` state dict (unprefixed) for ``model``."""
    params = config["model"]["params"]
    ours = model.component_state_dict(overrides)
    state: dict[str, torch.Tensor] = {}
    unet_map = unet_key_map(model.unet)
    for prefix, mapping in (("unet.", unet_map), ("vae.", vae_key_map(model.vae))):
        for ldm, (key, squeezed) in mapping.items():
            value = ours[prefix + key]
            state[ldm] = value[:, :, None, None] if squeezed else value
    for key, value in ours.items():
        if key.startswith("text_encoder."):
            state[TEXT_PREFIX + key[len("text_encoder."):]] = value
    state.update(schedule_buffers(params))
    if params.get("use_ema", True):
        state["model_ema.decay"] = torch.tensor(0.9999, dtype=torch.float32)
        state["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
        for ldm in unet_map:
            state[ema_name(ldm)] = state[ldm].clone()
    source = _source_state(model) if model.extra.get("source_format") == FORMAT else {}
    if not source:
        return state
    # Lossless: what the source holds and this model does not. The live UNet weights come back while the UNet
    # still equals the (EMA) weights read from the source.
    unchanged = all(key in source and torch.equal(source[key], state[key]) for key in
                    (ema_name(ldm) if model.extra.get("easynlp", {}).get("ema") else ldm for ldm in unet_map))
    merged = {}
    for key, value in source.items():
        if key in state and not (unchanged and key in unet_map) and key not in SCHEDULE_BUFFERS + EMA_STATE:
            merged[key] = state[key]
        else:
            merged[key] = value
    merged.update({key: value for key, value in state.items() if key not in merged})
    return merged


def save(model: LatentDiffusion, folder: str, overrides: dict | None = None,
         dtype: torch.dtype | None = None) -> list[str]:
    """Write EasyNLP's checkpoint files into ``folder`` (weights last, each file atomically); returns them."""
    _check_writable(model)
    source_config = model.extra.get("easynlp", {}).get("config")
    config = copy.deepcopy(source_config) if source_config else build_config(model)
    return write_checkpoint(model, folder, config, easynlp_state(model, config, overrides), dtype)


def is_easynlp_model(model: LatentDiffusion) -> bool:
    """Whether ``model`` is in EasyNLP's format (read from one; saved as one by default)."""
    return model.extra.get("source_format") == FORMAT
