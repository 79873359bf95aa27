"""LoRA files of the flow-matching DiTs (Z-Image, Qwen-Image) in the key layout ComfyUI loads.

ComfyUI maps a LoRA's ``diffusion_model.<diffusers module>`` keys onto its own modules for both models
(``comfy/lora.py``'s key map; for Z-Image through ``comfy.utils.z_image_to_diffusers``, which also splits its fused
``qkv``), and reads a module's ``lora_A.weight``/``lora_B.weight`` pair with its ``alpha`` (scale ``alpha / rank``).
diffusers' ``ZImagePipeline``/``QwenImagePipeline.load_lora_weights`` convert the same layout back
(``_convert_non_diffusers_z_image_lora_to_diffusers``, ``_convert_non_diffusers_qwen_lora_to_diffusers``), so a file
in it loads in both tools. A diffusers file (``transformer.<module>.lora_A.weight``, the adapter's ``lora_alpha`` in
its metadata) holds the same adapter under other names.
"""

from __future__ import annotations

import torch

COMFYUI_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
LORA_PAIR = (".lora_A.weight", ".lora_B.weight")


def transformer_config(metadata: dict | None) -> dict:
    """The transformer adapter's peft config from diffusers' LoRA metadata (``lora_state_dict(...,
    return_lora_metadata=True)``: each config's keys prefixed by its component, ``transformer.lora_alpha``)."""
    return {key[len(DIFFUSERS_PREFIX):]: value for key, value in (metadata or {}).items()
            if key.startswith(DIFFUSERS_PREFIX)}


def lora_modules(tensors: dict[str, torch.Tensor], prefix: str) -> list[str]:
    """The module names (without ``prefix``) that hold a ``lora_A``/``lora_B`` pair."""
    return sorted(key[len(prefix):-len(LORA_PAIR[0])] for key in tensors
                  if key.startswith(prefix) and key.endswith(LORA_PAIR[0]))


def diffusers_to_comfyui(tensors: dict[str, torch.Tensor], config: dict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A diffusers transformer LoRA → ComfyUI's keys: each module's pair under ``diffusion_model.`` and its
    ``alpha`` (the adapter's ``lora_alpha`` × ``scale``). Raises ``ValueError`` for what this conversion does not
    hold (text-encoder adapters, peft's per-module ``alpha_pattern``/``rank_pattern``)."""
    other = sorted(key for key in tensors if not key.startswith(DIFFUSERS_PREFIX))
    if other:
        raise ValueError(f"it holds weights other than the transformer's ({other[0]}, …), which ComfyUI's layout "
                         f"for these models has no place for")
    modules = lora_modules(tensors, DIFFUSERS_PREFIX)
    if not modules or len(modules) * 2 != len(tensors):
        raise ValueError("it is not a transformer LoRA of lora_A/lora_B pairs")
    if config.get("alpha_pattern") or config.get("rank_pattern"):
        raise ValueError("its adapter has per-module alphas or ranks (alpha_pattern, rank_pattern)")
    converted: dict[str, torch.Tensor] = {}
    for module in modules:
        down, up = (tensors[DIFFUSERS_PREFIX + module + end] for end in LORA_PAIR)
        rank = down.shape[0]
        alpha = float(config.get("lora_alpha") or rank)
        converted[COMFYUI_PREFIX + module + LORA_PAIR[0]] = down.contiguous()
        converted[COMFYUI_PREFIX + module + LORA_PAIR[1]] = up.contiguous()
        converted[COMFYUI_PREFIX + module + ".alpha"] = torch.tensor(alpha * scale, dtype=torch.float32)
    return converted


def module_deltas(tensors: dict[str, torch.Tensor], config: dict, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Each module's weight change in a diffusers transformer LoRA: ``scale × lora_alpha / rank × B @ A``
    (``lora_alpha`` from ``config``, the rank where it has none, as diffusers' loader takes it)."""
    deltas = {}
    for module in lora_modules(tensors, DIFFUSERS_PREFIX):
        down, up = (tensors[DIFFUSERS_PREFIX + module + end].double() for end in LORA_PAIR)
        alpha = float(config.get("lora_alpha") or down.shape[0])
        deltas[module] = scale * alpha / down.shape[0] * (up @ down)
    return deltas
