"""Tiny random models for the image metrics' tests, built offline: CLIP-style folders (Chinese-CLIP, AltCLIP,
CLIP) with a working processor, and a randomly initialised FID Inception-v3 weights file in pytorch-fid's layout.

Their scores mean nothing; they exercise the code paths a real checkpoint takes (never for judging images).
"""

from __future__ import annotations

import os

import torch

from easynlp_ldm.files import atomic_torch_save, atomic_write_bytes
from modelzoo.tiny import TINY_CHARS, write_vocab

CLIP_KINDS = ("chinese_clip", "altclip", "clip")
_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=64)
_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2)
_PROJECTION = 16
_LATIN = "abcdefghijklmnopqrstuvwxyz"


def _clip_tokenizer():
    """CLIP's byte-level BPE with no merges: every byte is its own token, so any text (Chinese too) tokenises."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(alphabet + [a + "</w>" for a in alphabet])}
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_TEXT["max_position_embeddings"])


def _xlmr_tokenizer(chars: str):
    """XLM-R's sentencepiece unigram built from a list of pieces (no sentencepiece training): the special tokens in
    XLM-R's order, the word marker, one piece per character."""
    from transformers import XLMRobertaTokenizer

    pieces = ["<s>", "<pad>", "</s>", "<unk>", "\u2581"] + sorted(set(chars + _LATIN))
    tokenizer = XLMRobertaTokenizer(vocab=[(piece, 0.0 if i < 4 else -1.0) for i, piece in enumerate(pieces)])
    tokenizer.model_max_length = _TEXT["max_position_embeddings"] - 2  # XLM-R's positions start after the padding id
    tokenizer.add_special_tokens({"mask_token": "<mask>"})
    return tokenizer


def make_tiny_clip(folder: str, kind: str = "chinese_clip", seed: int = 0, *, chars: str = TINY_CHARS) -> str:
    """A random ``ChineseCLIPModel`` / ``AltCLIPModel`` / ``CLIPModel`` folder with its processor (32×32 images),
    saved by transformers' ``save_pretrained``; ``chars`` are the characters the BERT / XLM-R vocabularies cover."""
    import transformers as tf

    if kind not in CLIP_KINDS:
        raise ValueError(f"kind={kind!r}: one of {', '.join(CLIP_KINDS)}")
    os.makedirs(folder, exist_ok=True)
    image_kwargs = dict(size={"shortest_edge": _VISION["image_size"]},
                        crop_size={"height": _VISION["image_size"], "width": _VISION["image_size"]})
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "chinese_clip":
            vocab_path = os.path.join(folder, "vocab.txt")
            vocab = write_vocab(vocab_path, chars)
            tokenizer = tf.BertTokenizer(vocab_path, model_max_length=_TEXT["max_position_embeddings"])
            config = tf.ChineseCLIPConfig(text_config=dict(_TEXT, vocab_size=len(vocab)), vision_config=_VISION,
                                          projection_dim=_PROJECTION)
            model = tf.ChineseCLIPModel(config)
            processor = tf.ChineseCLIPProcessor(tf.ChineseCLIPImageProcessorPil(**image_kwargs), tokenizer)
        elif kind == "altclip":
            tokenizer = _xlmr_tokenizer(chars)
            config = tf.AltCLIPConfig(text_config=dict(_TEXT, vocab_size=len(tokenizer), project_dim=_TEXT[
                "hidden_size"], pad_token_id=tokenizer.pad_token_id), vision_config=_VISION,
                projection_dim=_PROJECTION)
            model = tf.AltCLIPModel(config)
            processor = tf.AltCLIPProcessor(tf.CLIPImageProcessorPil(**image_kwargs), tokenizer)
        else:
            tokenizer = _clip_tokenizer()
            config = tf.CLIPConfig(text_config=dict(_TEXT, vocab_size=len(tokenizer),
                                                    eos_token_id=tokenizer.eos_token_id,
                                                    bos_token_id=tokenizer.bos_token_id,
                                                    pad_token_id=tokenizer.pad_token_id),
                                   vision_config=_VISION, projection_dim=_PROJECTION)
            model = tf.CLIPModel(config)
            processor = tf.CLIPProcessor(tf.CLIPImageProcessorPil(**image_kwargs), tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_inception(path: str, seed: int = 0) -> str:
    """A randomly initialised FID Inception-v3 at full width (the real file's keys and shapes, ~96 MB) at ``path``
    (``.safetensors`` or a ``.pth`` state dict). The batch-norm statistics are set from one batch of random images
    so that the features keep a useful scale through the 94 layers instead of vanishing."""
    from modelzoo.image_metrics.inception import FIDInceptionV3

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        network = FIDInceptionV3()
        for module in network.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 1.0  # the running statistics become the calibration batch's
        with torch.no_grad():
            network.train()(torch.rand(4, 3, 64, 64))
    state = {name: tensor.contiguous() for name, tensor in network.state_dict().items()}
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import save

        atomic_write_bytes(path, save(state))
    else:
        atomic_torch_save(state, path)
    return path
