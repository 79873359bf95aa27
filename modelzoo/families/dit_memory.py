"""The flow-matching DiT families' part of the memory plan (the budget itself is easynlp_ldm/memory.py; the app's check
before the first step is appzoo/latent_diffusion/memory_plan.py; SD-1.x's counterpart is sd_memory.py): what a training
step of Z-Image's or Qwen-Image's transformer keeps alive.

  activations  what the transformer's backward pass keeps, counted per block from its config: a block over L tokens of
               width ``dim`` with a feed-forward of width ``ffn`` keeps L × (DIM_TENSORS × dim + ffn_tensors × ffn)
               elements (norms, modulation, q/k/v and their norms and rotary copies, attention output, projections,
               gates; the feed-forward's hidden activations: SwiGLU keeps 4, GELU 2), and on a CPU the attention's
               heads × L² probabilities (scaled_dot_product_attention's math path, which a padding mask selects there;
               on a GPU the memory-efficient kernel keeps none), and one block's attention backward creates
               ATTENTION_BACKWARD_TENSORS × heads × L² temporaries there. × micro-batch × bytes per element.
               Z-Image: ``n_refiner_layers`` noise-refiner blocks over the image tokens, as many context-refiner blocks
               over the text tokens, ``n_layers`` blocks over both. Qwen-Image (an MMDiT): ``num_layers`` dual-stream
               blocks, each the image tokens' and the text tokens' own projections and feed-forwards and one joint
               attention over both. Image tokens = (resolution / VAE factor / patch)², text tokens = the text length
               (an upper bound: the cache holds each caption's embedding without padding), each padded as the model
               pads them. With gradient checkpointing: each block's input, and one block's activations alive during
               its recomputation (a LoRA in fp32 was measured to keep LORA_FP32_CHECKPOINT_TENSORS × dim more per
               token and block; not explained yet, and absent under bf16 autocast). The backward pass frees a
               block's activations (with checkpointing: its kept input) as it allocates that block's gradients (the
               previous step's are freed before the forward pass): what they add to the peak, beside the gradients
               the plan counts already, is how far they exceed the trained parameters' gradients (most of them at a
               high resolution, none of a small image's under full fine-tuning; all of a LoRA's, whose gradients are
               the adapters'), plus the recomputed block's. Under bf16 autocast each projection of fp32 weights also
               keeps its weight's bf16 copy for backward.
  encode       caching latents: the VAE encoder's live tensors (sd_memory's count); the text-embedding cache's pass
               of the frozen text encoder, no gradients, is counted beside it (the larger of the two). Where the
               text encoder leaves memory once the cache is filled (``DiTFamily.release_text_encoder``: a model read
               from a folder) its weights are the footprint's ``encode_only_bytes``, counted at load and in this
               phase, not at the step: the plan's peak is the larger of this phase and the training step.
  shards       ``sharding=fsdp``: each layer of the transformer's layer lists (Z-Image's refiners and main layers,
               Qwen-Image's blocks: the family's ``shard_units``) is a ``fully_shard`` unit, the transformer the root
               (a LoRA's adapters with it); a trained text encoder is counted whole in every process (an upper bound:
               the trainer shards its layers too)

The coefficients are fitted on bench/train_memory.py's peak RSS of a reduced-width Z-Image layout
(bench/configs/zimage_reduced.json: all 30 + 2 + 2 blocks, dim 640) on CPU; see there for the rows used and held out.
Qwen-Image's coefficients are Z-Image's, not measured on a Qwen-Image layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from easynlp_ldm.memory import MemorySettings, ModelFootprint, ShardLayout
from modelzoo.families.sd_memory import MAX_ENCODE_BATCH, text_activation_bytes, vae_encode_bytes

DIM_TENSORS = 18.0  # saved tensors of width dim per token of a block (counted from the block's forward)
SWIGLU_TENSORS = 4.0  # Z-Image's feed-forward: w1 and w3 outputs, silu, their product (width ffn)
GELU_TENSORS = 2.0  # Qwen-Image's: the projection and its GELU (width ffn)
ATTENTION_PROBABILITY_TENSORS = 1.0  # heads × L² saved by the CPU's math attention (probabilities)
ATTENTION_BACKWARD_TENSORS = 5.0  # heads × L² fp32 temporaries of one block's attention backward on a CPU
EDGE_TENSORS = 8.0  # the patch embedding, the final layer, the unpatchified output and the loss, × image tokens × dim
ACTIVATION_SCALE = 1.0  # measured / counted, full fine-tuning without gradient checkpointing
CHECKPOINT_SCALE = 1.0  # measured / counted, the block recomputed with gradient checkpointing
AMP_WEIGHT_COPY_BYTES = 2.0  # bf16 copy of each transformer weight that autocast's projections save for backward
CHECKPOINT_TENSORS = 1.0  # per checkpointed block: its input (L × dim)
LORA_FP32_CHECKPOINT_TENSORS = 8.0  # measured beside it, per block, for a LoRA in fp32 (not with bf16 autocast)
AMP_ACTIVATION_BYTES = 3.26  # bytes per saved element under bf16 autocast (norms, RoPE, softmax stay fp32)
TEXT_ENCODE_BATCH = 16  # appzoo/latent_diffusion/data.py encodes this many captions per call
TEXT_ENCODE_TENSORS = 4.0  # live tensors of a frozen decoder layer's pass, × tokens × (hidden + intermediate)


@dataclass(frozen=True)
class Stream:
    """Blocks of one kind: how many, over which tokens ("image", "text" or "joint"), their feed-forward."""

    blocks: int
    tokens: str
    ffn: int
    ffn_tensors: float


@dataclass(frozen=True)
class DiTLayout:
    """What the activation count needs of a DiT's config."""

    dim: int
    heads: int
    patch: int
    streams: tuple[Stream, ...]
    pad_to: int = 1  # Z-Image pads each sequence to a multiple of 32 tokens


def zimage_layout(config: dict[str, Any]) -> DiTLayout:
    dim = int(config.get("dim", 3840))
    ffn = int(dim / 3 * 8)  # ZImageTransformerBlock's FeedForward
    refiners, layers = int(config.get("n_refiner_layers", 2)), int(config.get("n_layers", 30))
    patch = int(list(config.get("all_patch_size", (2,)))[0])
    return DiTLayout(dim=dim, heads=int(config.get("n_heads", 30)), patch=patch,
                     streams=(Stream(refiners, "image", ffn, SWIGLU_TENSORS),
                              Stream(refiners, "text", ffn, SWIGLU_TENSORS),
                              Stream(layers, "joint", ffn, SWIGLU_TENSORS)), pad_to=32)


def qwenimage_layout(config: dict[str, Any]) -> DiTLayout:
    heads = int(config.get("num_attention_heads", 24))
    dim = heads * int(config.get("attention_head_dim", 128))
    return DiTLayout(dim=dim, heads=heads, patch=int(config.get("patch_size", 2)),
                     # a dual-stream block: the image and the text tokens each through their own projections and
                     # feed-forward of the same widths, one attention over both: counted as one stream over both
                     streams=(Stream(int(config.get("num_layers", 60)), "joint", 4 * dim, GELU_TENSORS),))


def _padded(tokens: int, multiple: int) -> int:
    return -(-tokens // multiple) * multiple


def block_elements(layout: DiTLayout, stream: Stream, image: int, text: int, attention_probabilities: bool) -> float:
    """Elements one block of ``stream`` keeps for backward, per sample (see the module docstring)."""
    tokens = {"image": image, "text": text, "joint": image + text}[stream.tokens]
    kept = tokens * (DIM_TENSORS * layout.dim + stream.ffn_tensors * stream.ffn)
    if attention_probabilities:
        kept += ATTENTION_PROBABILITY_TENSORS * layout.heads * tokens * tokens
    return kept


def transformer_activation_bytes(layout: DiTLayout, *, resolution: int, vae_scale_factor: int, text_tokens: int,
                                 micro_batch: int, checkpointing: bool, amp: bool, on_cpu: bool,
                                 lora: bool = False) -> tuple[int, int]:
    """What the transformer's backward pass keeps for ``micro_batch`` samples (see the module docstring): (bytes
    freed block by block as the backward pass allocates the gradients, bytes alive throughout it)."""
    side = resolution // vae_scale_factor // layout.patch
    image, text = _padded(side * side, layout.pad_to), _padded(text_tokens, layout.pad_to)
    tokens = {"image": image, "text": text, "joint": image + text}
    blocks = [(stream, block_elements(layout, stream, image, text, on_cpu)) for stream in layout.streams]
    edges = EDGE_TENSORS * image * layout.dim
    per_element = (AMP_ACTIVATION_BYTES if amp else 4.0) * micro_batch
    # a block's backward through the CPU's math attention: the probabilities' and the scores' gradients (fp32)
    longest = max(tokens[s.tokens] for s in layout.streams)
    attention_backward = ATTENTION_BACKWARD_TENSORS * layout.heads * longest * longest * 4 * micro_batch \
        if on_cpu else 0
    if not checkpointing:
        return int(ACTIVATION_SCALE * (sum(s.blocks * e for s, e in blocks) + edges) * per_element), \
            int(attention_backward)
    # each block's input kept; one block's activations alive while it is recomputed, the last one beside the gradients
    kept = CHECKPOINT_TENSORS + (LORA_FP32_CHECKPOINT_TENSORS if lora and not amp else 0)
    inputs = sum(s.blocks * kept * layout.dim * tokens[s.tokens] for s, _ in blocks)
    return int(inputs * per_element), \
        int(CHECKPOINT_SCALE * (max(e for _, e in blocks) + edges) * per_element + attention_backward)


def text_encode_bytes(config: dict[str, Any] | None, text_tokens: int, amp: bool) -> int:
    """The frozen text encoder's pass over one batch of captions for the cache (no gradients): a layer's live tensors
    and its attention scores."""
    if not config:
        return 0
    hidden = int(config.get("hidden_size", 2560))
    inner = int(config.get("intermediate_size", 4 * hidden))
    heads = int(config.get("num_attention_heads", 32))
    per_caption = TEXT_ENCODE_TENSORS * text_tokens * (hidden + inner) + heads * text_tokens * text_tokens
    return int(per_caption * TEXT_ENCODE_BATCH * (2.0 if amp else 4.0))


@dataclass(frozen=True)
class DiTActivations:
    """The ``easynlp_ldm.memory.ActivationPlan`` of a flow-matching DiT (see the module docstring)."""

    layout: DiTLayout
    vae_config: dict[str, Any] | None
    vae_scale_factor: int
    text_tokens: int
    text_config: dict[str, Any] | None = None  # the text encoder that fills the embedding cache (None: not resident)
    trained_text_config: dict[str, Any] | None = None  # the text encoder trained beside (train_text_encoder)
    lora: bool = False  # the transformer frozen, a LoRA of it trained
    gradient_bytes: int = 0  # the trained parameters' gradients, allocated as the activations are freed
    fp32_transformer_parameters: int = 0  # trained or frozen: under autocast each keeps its bf16 copy for backward

    labels = {"encode": "VAE/text encode", "text_activations": "text-encoder activations"}

    def step(self, settings: MemorySettings) -> dict[str, int]:
        s = settings
        released, transient = transformer_activation_bytes(
            self.layout, resolution=s.resolution, vae_scale_factor=self.vae_scale_factor,
            text_tokens=self.text_tokens, micro_batch=s.micro_batch_size, checkpointing=s.gradient_checkpointing,
            amp=s.use_amp, on_cpu=s.device == "cpu", lora=self.lora)
        if s.use_amp and not s.gradient_checkpointing:  # saved for the backward pass with the activations
            released += int(AMP_WEIGHT_COPY_BYTES * self.fp32_transformer_parameters)
        activations = transient + max(0, released - self.gradient_bytes)
        if not s.cache_inputs:  # the VAE encodes every micro-batch during the step instead
            activations += vae_encode_bytes(self.vae_config, s.resolution, s.micro_batch_size, s.use_amp)
        # a trained text encoder: its every layer's activations at the full text length, as SD-1.x's are counted
        # (an upper bound: the pipeline's hidden layer may stop short of the last, a caption of its padding)
        return {"activations": activations,
                "text_activations": text_activation_bytes(self.trained_text_config, self.text_tokens,
                                                          s.micro_batch_size, s.use_amp)}

    def encode(self, settings: MemorySettings) -> int:
        s = settings
        batch = min(s.micro_batch_size, MAX_ENCODE_BATCH)
        latents = vae_encode_bytes(self.vae_config, s.resolution, batch, s.use_amp) if s.cache_inputs else 0
        return max(latents, text_encode_bytes(self.text_config, self.text_tokens, s.use_amp))


LAYOUTS = {"zimage": zimage_layout, "qwenimage": qwenimage_layout}


def lora_shapes(transformer, targets: tuple[str, ...], rank: int) -> list[tuple[int, ...]]:
    """The down and up matrices of a rank-``rank`` LoRA of the transformer's linear layers named ``targets``."""
    shapes: list[tuple[int, ...]] = []
    for name, module in transformer.named_modules():
        if name.endswith(tuple(f".{target}" for target in targets)) and hasattr(module, "in_features"):
            shapes += [(rank, module.in_features), (module.out_features, rank)]
    return shapes


def transformer_shard_layout(model, components: tuple[str, ...] = ("transformer",)) -> ShardLayout:
    """How ``sharding=fsdp`` wraps a DiT's transformer: the family's ``shard_units`` (every layer of its layer
    lists), the trainer's own rule."""
    from modelzoo.families import family_of

    return ShardLayout.of(components, model.transformer, family_of(model).shard_units(model.transformer))


def dit_footprint(model, *, train_target: str = "transformer", text_length: int = 512,
                  lora_targets: tuple[str, ...] = (), lora_rank: int = 4, text_encoder_leaves: bool = False,
                  text_encoder_frozen: tuple[str, ...] | None = None) -> ModelFootprint:
    """The footprint of a ``modelzoo.families.dit.DiTModel`` for ``transformer`` or ``lora``: the transformer's
    parameters trained or frozen (a LoRA's adapters trained instead), the VAE's and the text encoder's frozen where
    they are resident (a text encoder set to None or on the meta device is not; one that ``text_encoder_leaves``
    after filling the text-embedding cache counts in the encode phase only), and the transformer's activations.
    ``text_encoder_frozen`` (not None: ``train_text_encoder``): the text encoder trains, but for its parameters
    named with one of these prefixes (``DiTFamily.text_encoder_unreached``), and its activations count at the step;
    no text-embedding cache is filled."""
    trained: dict[str, list[tuple[int, ...]]] = {}
    frozen: dict[str, int] = {}
    text_encoder_bytes = 0
    transformer_is_meta = next(model.transformer.parameters()).is_meta  # a plan of a config: all on meta
    for name in ("transformer", "text_encoder", "vae"):
        module = getattr(model, name, None)
        for param_name, param in module.named_parameters() if module is not None else ():
            if name == "transformer" and train_target == "transformer":
                trained.setdefault(name, []).append(tuple(param.shape))
            elif name == "text_encoder" and text_encoder_frozen is not None \
                    and not param_name.startswith(text_encoder_frozen):
                trained.setdefault(name, []).append(tuple(param.shape))
            elif param.is_meta and not transformer_is_meta:  # a part moved to meta has left memory
                continue
            elif name == "text_encoder" and text_encoder_leaves:
                text_encoder_bytes += param.numel() * param.element_size()
            else:
                frozen[name] = frozen.get(name, 0) + param.numel()
    if train_target == "lora":
        trained["lora"] = lora_shapes(model.transformer, lora_targets, lora_rank)
    text_encoder = getattr(model, "text_encoder", None)
    text_config = text_encoder.config.get_text_config().to_dict() if text_encoder is not None else None
    trained_text_config, text_config = (text_config, None) if text_encoder_frozen is not None else (None, text_config)
    activations = DiTActivations(layout=LAYOUTS[model.family](dict(model.transformer.config)),
                                 vae_config=dict(model.vae.config), vae_scale_factor=model.vae_scale_factor,
                                 text_tokens=text_length, text_config=text_config,
                                 trained_text_config=trained_text_config, lora=train_target == "lora",
                                 # the transformer's (or adapters') gradients; the text encoder's backward comes after
                                 gradient_bytes=4 * sum(math.prod(shape) for part, shapes in trained.items()
                                                        if part != "text_encoder" for shape in shapes),
                                 fp32_transformer_parameters=sum(p.numel() for p in model.transformer.parameters()
                                                                 if p.dtype == torch.float32))
    # base_precision (bf16 frozen weights of an fp32 run) is the app's: memory_plan.py sets frozen_param_bytes
    shards = transformer_shard_layout(model, ("transformer", "lora"))
    return ModelFootprint(trained=trained, frozen=frozen, param_bytes=model.dtype.itemsize, activations=activations,
                          encode_only_bytes=text_encoder_bytes, shards=shards)
