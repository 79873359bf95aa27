"""Tiny random Z-Image and Qwen-Image folders and their ControlNets (for tests; never for pictures), built offline in
seconds.

The sizes are diffusers' own fast tests' (tests/pipelines/z_image/test_z_image.py and
tests/pipelines/qwenimage/test_qwenimage.py). Those tests download a tiny Qwen tokenizer from the hub; here a
byte-level BPE of a few hundred tokens (Latin and the Chinese characters of ``TINY_CHARS``, Qwen's special tokens) is
trained on the spot with the ``tokenizers`` package and given Qwen's chat template, and the text model's vocabulary is
the tokenizer's. Each folder is written by the pipeline's own ``save_pretrained`` (``model_index.json`` names
``ZImagePipeline`` / ``QwenImagePipeline``), plus ``_image_size``, the native size the family reads (diffusers
ignores index keys starting with ``_``). The same seed writes the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import torch

from easynlp_ldm.files import atomic_write_text
from modelzoo.tiny import TINY_CHARS

# Qwen's special tokens (Qwen2.5-VL's vision ones included: its config names their ids).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<think>", "</think>")
# Qwen3's chat template, reduced to what the pipelines use: role turns, the generation prompt, and the empty thinking
# block that enable_thinking=False adds.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")
CORPUS = ("a red circle on a white background", "a blue square in the upper left corner", "dance monkey",
          "bad quality, blurry", "Describe the image by detailing the color, shape, size and texture",
          "一个红色的圆形在白色背景上", "左上角有一个蓝色正方形", TINY_CHARS)
VOCAB_SIZE = 384


def make_tiny_tokenizer(vocab_size: int = VOCAB_SIZE, corpus: Sequence[str] = CORPUS):
    """A byte-level BPE ``Qwen2TokenizerFast`` with Qwen's special tokens and chat template, trained on ``corpus``
    (every byte is in its alphabet, so any text tokenises)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(list(corpus) * 4, trainer=trainer)
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, bos_token=None,
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=1024)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _update_index(folder: str, **entries) -> None:
    """``entries`` set in the folder's ``model_index.json``."""
    path = os.path.join(folder, "model_index.json")
    with open(path, encoding="utf-8") as handle:
        index = json.load(handle)
    index.update(entries)
    atomic_write_text(path, json.dumps(index, indent=2, sort_keys=True) + "\n")


def _mark_native_size(folder: str, image_size: int) -> None:
    _update_index(folder, _image_size=image_size)


def make_tiny_zimage_model(folder: str, *, seed: int = 0, image_size: int = 32,
                           overrides: dict[str, dict] | None = None) -> str:
    """A tiny Z-Image folder: ``ZImageTransformer2DModel`` (dim 32, 2 layers), a 16-channel ``AutoencoderKL`` (factor
    2), a 2-layer ``Qwen3Model`` and the tiny tokenizer, ``FlowMatchEulerDiscreteScheduler``. ``overrides``:
    component (``transformer``, ``vae``, ``text_encoder``) → config keys replacing these sizes (bench/train_memory.py's
    reduced-width Z-Image layout)."""
    overrides = overrides or {}
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = make_tiny_tokenizer()
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**{
        **dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
               n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0,
               t_scale=1000.0, axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]),
        **overrides.get("transformer", {})})
    with torch.no_grad():  # created with torch.empty: fixed, as diffusers' test does, so no NaN can come from them
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    vae = AutoencoderKL(**{
        **dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
               up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64], layers_per_block=1,
               latent_channels=16, norm_num_groups=32, sample_size=image_size, scaling_factor=0.3611,
               shift_factor=0.1159),
        **overrides.get("vae", {})})
    text_encoder = Qwen3Model(Qwen3Config(**{
        **dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2, head_dim=8, vocab_size=len(tokenizer), max_position_embeddings=512,
               pad_token_id=tokenizer.pad_token_id),
        **overrides.get("text_encoder", {})})).eval()
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=text_encoder,
                          tokenizer=tokenizer, transformer=transformer)
    pipe.save_pretrained(folder)
    _mark_native_size(folder, image_size)
    return folder


def make_tiny_qwenimage_model(folder: str, *, seed: int = 0, image_size: int = 32) -> str:
    """A tiny Qwen-Image folder: ``QwenImageTransformer2DModel`` (2 layers, 3 heads of 16), a 4-channel
    ``AutoencoderKLQwenImage`` (factor 4), a 2-layer ``Qwen2_5_VLForConditionalGeneration`` and the tiny tokenizer,
    ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's resolution-dependent shift."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = make_tiny_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    z_dim = 4
    vae = AutoencoderKLQwenImage(base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * z_dim,
                                 latents_std=[1.0] * z_dim)
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tokenizer), "rope_theta": 1000000.0,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                     "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.pad_token_id,
                     "eos_token_id": tokenizer.eos_token_id},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vocab_size=len(tokenizer), bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"])
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192,
                                                max_shift=0.9, shift=1.0, shift_terminal=0.02,
                                                use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.save_pretrained(folder)
    _mark_native_size(folder, image_size)
    return folder


def _unzero(model: torch.nn.Module, std: float = 0.2) -> None:
    """ControlNets start with zero output projections (so training starts from the base model): drawn at random
    instead, so a tiny ControlNet moves pixels and a test can see it act."""
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(0.0, std)


def make_tiny_zimage_controlnet(folder: str, *, seed: int = 0, inpainting: bool = False) -> str:
    """A tiny ``ZImageControlNetModel`` folder for ``make_tiny_zimage_model``'s transformer (dim 32, one control
    layer, one refiner layer; the pipeline shares the transformer's embedders with it). ``inpainting``: for
    ``ZImageControlNetInpaintPipeline``, which gives it the control image's latents, the mask and the masked image's
    latents (16 + 1 + 16 channels)."""
    from diffusers import ZImageControlNetModel

    torch.manual_seed(seed)
    controlnet = ZImageControlNetModel(
        control_layers_places=[0], control_refiner_layers_places=[0], control_in_dim=33 if inpainting else 16,
        all_patch_size=(2,),
        all_f_patch_size=(1,), dim=32, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True)
    _unzero(controlnet)
    controlnet.save_pretrained(folder)
    return folder


def make_tiny_qwenimage_controlnet(folder: str, *, seed: int = 0, inpainting: bool = False) -> str:
    """A tiny ``QwenImageControlNetModel`` folder for ``make_tiny_qwenimage_model``'s transformer (diffusers' fast
    test's sizes: 2 layers, 3 heads of 16). ``inpainting``: for ``QwenImageControlNetInpaintPipeline``, whose
    conditioning is the masked image's latents and the mask (the mask's channel in 2×2 patches: 4 more inputs)."""
    from diffusers import QwenImageControlNetModel

    torch.manual_seed(seed)
    controlnet = QwenImageControlNetModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, axes_dims_rope=(8, 4, 4), extra_condition_channels=4 if inpainting else 0)
    _unzero(controlnet)
    controlnet.save_pretrained(folder)
    return folder


def make_tiny_qwenimage_edit_model(folder: str, *, seed: int = 0, image_size: int = 32) -> str:
    """A tiny Qwen-Image-Edit folder: ``make_tiny_qwenimage_model``'s components (its Qwen2.5-VL vision tower reads
    the input image) and a ``processor/`` (the tiny tokenizer and a Qwen2-VL image processor of 14-pixel patches
    merged 2×2, images scaled to 56²–112² pixels so the image takes a few tokens), ``model_index.json`` naming
    ``QwenImageEditPipeline``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from modelzoo.qwen_vl_processor import StillImageQwen2VLProcessor

    make_tiny_qwenimage_model(folder, seed=seed, image_size=image_size)
    processor = StillImageQwen2VLProcessor(image_processor=Qwen2VLImageProcessorPil(min_pixels=56 * 56,
                                                                                    max_pixels=112 * 112),
                                           tokenizer=make_tiny_tokenizer())
    processor.save_pretrained(os.path.join(folder, "processor"))
    _update_index(folder, _class_name="QwenImageEditPipeline", processor=["transformers", "Qwen2VLProcessor"])
    return folder


def make_tiny_qwenimage_edit_plus_model(folder: str, *, seed: int = 0, image_size: int = 32) -> str:
    """A tiny Qwen-Image-Edit-Plus folder (Qwen-Image-Edit-2509's layout): ``make_tiny_qwenimage_edit_model``'s, its
    ``model_index.json`` naming ``QwenImageEditPlusPipeline``."""
    make_tiny_qwenimage_edit_model(folder, seed=seed, image_size=image_size)
    _update_index(folder, _class_name="QwenImageEditPlusPipeline")
    return folder
