"""The SD-1.x family's part of the memory plan (the budget itself is easynlp_ldm/memory.py; the app's check before
the first step is appzoo/latent_diffusion/memory_plan.py): what a latent diffusion model's passes keep alive.

  activations  what the backward pass keeps: counted per UNet block from the architecture (feature-map elements ×
               saved tensors per block), × micro-batch × bytes per element; with gradient checkpointing, the blocks'
               inputs and one block's recomputation. The coefficients are calibrated on measured peaks
               (``bench/train_memory.py``). Without the latent cache the VAE encodes every micro-batch during the
               step: its live tensors are counted here too
  text_activations  a trained text encoder's activations (``train_text_encoder``)
  encode       caching latents: the VAE encoder's live tensors for one batch of images (no gradients)
  shards       ``sharding=fsdp``: the UNet's down, mid and up blocks are its ``fully_shard`` units (the family's
               ``shard_units``), the UNet the root; a trained text encoder is counted whole in every process (an upper
               bound: the trainer shards its layers too)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from easynlp_ldm.memory import MemorySettings, ModelFootprint, ShardLayout

# Calibrated on bench/train_memory.py's peak RSS of SD-1.5's architecture on CPU (1 031 M parameters, micro-batch 1)
# together with easynlp_ldm/memory.py's per-parameter coefficients: see there for the runs and the held-out ones.
RESNET_TENSORS = 10.0  # feature maps a ResNet block keeps for backward (norms, activations, convs, skip), × C·H·W
ATTENTION_TENSORS = 32.0  # a transformer block: norms, q/k/v/out of two attentions, GEGLU feed-forward (8×), …
SAMPLER_TENSORS = 2.0  # down/up-sampling convolution
CHECKPOINT_TENSORS = 2.0  # per checkpointed block with gradient checkpointing: its input (+ the skip it keeps)
ACTIVATION_SCALE = 0.46  # measured / counted, without gradient checkpointing (0.87 GiB at 512², fp32)
CHECKPOINT_SCALE = 0.38  # measured / counted, with gradient checkpointing
AMP_ACTIVATION_BYTES = 3.26  # bytes per saved element under bf16 autocast (norms, softmax, attention stay fp32)
VAE_ENCODE_TENSORS = 6.5  # live full-resolution feature maps of the VAE encoder's first level (no gradients)
MAX_ENCODE_BATCH = 32  # latents are cached at min(micro-batch, this) images per VAE call
CONTROLNET_COPIES = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.", "add_embedding.", "class_embedding.")


def _unet_blocks(config: dict[str, Any], latent: int) -> list[tuple[str, int, int]]:
    """(kind, channels, side) of every block of a diffusers UNet2DConditionModel at a latent side."""
    channels = list(config.get("block_out_channels", (320, 640, 1280, 1280)))
    layers = config.get("layers_per_block", 2)
    down = config.get("down_block_types", ())
    up = config.get("up_block_types", ())
    levels = len(channels)
    blocks = [("sampler", channels[0], latent)]  # conv_in
    for i, kind in enumerate(down):
        side = max(1, latent >> i)
        for _ in range(layers):
            blocks.append(("resnet", channels[i], side))
            if "CrossAttn" in kind or "Attn" in kind:
                blocks.append(("attention", channels[i], side))
        if i < levels - 1:
            blocks.append(("sampler", channels[i], max(1, side // 2)))
    side = max(1, latent >> (levels - 1))
    blocks += [("resnet", channels[-1], side), ("attention", channels[-1], side), ("resnet", channels[-1], side)]
    for j, kind in enumerate(up):
        i = levels - 1 - j
        side = max(1, latent >> i)
        for _ in range(layers + 1):
            blocks.append(("resnet", channels[i], side))
            if "CrossAttn" in kind or "Attn" in kind:
                blocks.append(("attention", channels[i], side))
        if i > 0:
            blocks.append(("sampler", channels[i], side * 2))
    blocks.append(("sampler", channels[0], latent))  # norm_out, conv_out
    return blocks


_TENSORS = {"resnet": RESNET_TENSORS, "attention": ATTENTION_TENSORS, "sampler": SAMPLER_TENSORS}


def unet_activation_bytes(config: dict[str, Any], latent: int, micro_batch: int, checkpointing: bool,
                          amp: bool) -> int:
    """What the UNet's backward pass keeps for ``micro_batch`` samples at a latent side (see the module docstring)."""
    per_element = AMP_ACTIVATION_BYTES if amp else 4.0
    blocks = _unet_blocks(config, latent)
    counted = [_TENSORS[kind] * c * side * side for kind, c, side in blocks]
    if not checkpointing:
        elements = ACTIVATION_SCALE * sum(counted)
    else:  # each block's input kept, one block's activations alive during its recomputation
        kept = sum(CHECKPOINT_TENSORS * c * side * side for kind, c, side in blocks)
        elements = CHECKPOINT_SCALE * (kept + max(counted))
    return int(elements * per_element * micro_batch)


def vae_encode_bytes(config: dict[str, Any] | None, resolution: int, batch: int, amp: bool) -> int:
    if not config:
        return 0
    first = list(config.get("block_out_channels", (128,)))[0]
    return int(VAE_ENCODE_TENSORS * first * resolution * resolution * (2.6 if amp else 4.0) * batch)


def text_activation_bytes(config: dict[str, Any] | None, length: int, micro_batch: int, amp: bool) -> int:
    if not config:
        return 0
    hidden = config.get("hidden_size", 768)
    layers = config.get("num_hidden_layers", 12)
    inner = config.get("intermediate_size", 4 * hidden)
    heads = config.get("num_attention_heads", 12)
    per_layer = length * (12 * hidden + 2 * inner) + 3 * heads * length * length
    return int(layers * per_layer * (AMP_ACTIVATION_BYTES if amp else 4.0) * micro_batch)


@dataclass(frozen=True)
class LatentDiffusionActivations:
    """The ``easynlp_ldm.memory.ActivationPlan`` of a latent diffusion model: the architectures whose activations it
    counts (see the module docstring)."""

    unet_config: dict[str, Any] | None = None  # trained diffusion UNet (activations counted); None: not counted
    vae_config: dict[str, Any] | None = None  # the VAE that encodes images for the cache
    vae_scale_factor: int = 8
    text_config: dict[str, Any] | None = None  # a trained text encoder's config (hidden_size, layers, …)
    text_length: int = 77

    labels = {"text_activations": "text-encoder activations", "encode": "VAE encode"}

    def step(self, settings: MemorySettings) -> dict[str, int]:
        s = settings
        activations = (unet_activation_bytes(self.unet_config, s.resolution // self.vae_scale_factor,
                                             s.micro_batch_size, s.gradient_checkpointing, s.use_amp)
                       if self.unet_config else 0)
        if not s.cache_inputs:  # the VAE encodes every micro-batch during the step instead
            activations += vae_encode_bytes(self.vae_config, s.resolution, s.micro_batch_size, s.use_amp)
        return {"activations": activations,
                "text_activations": text_activation_bytes(self.text_config, self.text_length, s.micro_batch_size,
                                                          s.use_amp)}

    def encode(self, settings: MemorySettings) -> int:
        s = settings
        if not s.cache_inputs:
            return 0
        return vae_encode_bytes(self.vae_config, s.resolution, min(s.micro_batch_size, MAX_ENCODE_BATCH), s.use_amp)


def unet_shard_layout(model, components: tuple[str, ...] = ("unet",)) -> ShardLayout:
    """How ``sharding=fsdp`` wraps the UNet: the family's ``shard_units`` (each down block, the mid block and each up
    block), the trainer's own rule."""
    from modelzoo.families import family_of

    return ShardLayout.of(components, model.unet, family_of(model).shard_units(model.unet))


def controlnet_shard_layout(model) -> ShardLayout:
    """How ``sharding=fsdp`` wraps a ControlNet made from the UNet (``ControlNetModel.from_unet``: a copy of its encoder
    half): the copies of the UNet's down blocks and mid block are its units (the family's rule), the rest of the copy
    (the input convolution and embeddings) its root; the frozen UNet is not sharded."""
    blocks = [*model.unet.down_blocks, model.unet.mid_block]
    sizes = [sum(p.numel() for p in block.parameters()) for block in blocks]
    copied = sum(p.numel() for name, p in model.unet.named_parameters() if name.startswith(CONTROLNET_COPIES))
    return ShardLayout(components=("controlnet",), largest_block=max(sizes), root=copied - sum(sizes))


def latent_diffusion_footprint(model, *, train_target: str = "unet", train_text_encoder: bool = False,
                               text_length: int = 77, lora_rank: int = 4) -> ModelFootprint:
    """The footprint of a ``modelzoo.ldm.LatentDiffusion`` for a train target (before the task freezes parts).
    ``lora_rank`` is taken as every family's footprint takes it; a UNet's adapters are not counted here (see
    ``lora`` below), so it changes nothing."""
    components = {"unet": model.unet, "text_encoder": model.text_encoder, "vae": model.vae}
    if train_target == "unet":
        trained_names = {"unet"} | ({"text_encoder"} if train_text_encoder else set())
    elif train_target in ("vae", "vae_decoder"):
        trained_names = {"vae"}
    else:  # lora: the adapters, added later, are a few M parameters (the backward pass counts); controlnet: a trained
        # copy of the UNet's encoder half, counted below (the UNet stays frozen); rrdb
        trained_names = set()
    trained: dict[str, list[tuple[int, ...]]] = {}
    frozen: dict[str, int] = {}
    for name, module in components.items():
        for pname, param in module.named_parameters():
            is_trained = name in trained_names and not (
                train_target == "vae_decoder" and (pname.startswith("encoder.") or pname.startswith("quant_conv.")))
            if is_trained:
                trained.setdefault(name, []).append(tuple(param.shape))
            else:
                frozen[name] = frozen.get(name, 0) + param.numel()
            if train_target == "controlnet" and name == "unet" and pname.startswith(CONTROLNET_COPIES):
                trained.setdefault("controlnet", []).append(tuple(param.shape))
    first = next(model.unet.parameters())
    diffusion = train_target in ("unet", "lora", "controlnet")
    unet_config = dict(model.unet.config) if diffusion else None
    text_config = None
    if train_target == "unet" and train_text_encoder:
        text_config = dict(getattr(model.text_encoder, "config", {}).to_dict()) \
            if hasattr(getattr(model.text_encoder, "config", None), "to_dict") else {}
    activations = LatentDiffusionActivations(unet_config=unet_config,
                                             vae_config=dict(model.vae.config) if diffusion else None,
                                             vae_scale_factor=model.vae_scale_factor, text_config=text_config,
                                             text_length=text_length)
    shards = unet_shard_layout(model) if train_target in ("unet", "lora") else None
    if train_target == "controlnet":
        shards = controlnet_shard_layout(model)
    return ModelFootprint(trained=trained, frozen=frozen, param_bytes=first.element_size(), activations=activations,
                          shards=shards)
