"""Chinese text encoders: a transformers ``CLIPTextModel`` or ``BertModel`` behind a ``BertTokenizer`` (Chinese BERT
WordPiece ``vocab.txt``). Prompts are encoded exactly as diffusers' StableDiffusionPipeline does (padding to the
maximum length, attention mask only where the encoder asks for one), so our images match diffusers'."""

from __future__ import annotations

import json
import os

import torch
from transformers import BertConfig, BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModel

TEXT_ENCODERS = {"CLIPTextModel": (CLIPTextModel, CLIPTextConfig), "BertModel": (BertModel, BertConfig)}


def build_text_encoder(class_name: str, config: dict) -> torch.nn.Module:
    if class_name not in TEXT_ENCODERS:
        raise ValueError(f"text encoder class {class_name} is not supported (use {', '.join(TEXT_ENCODERS)})")
    model_class, config_class = TEXT_ENCODERS[class_name]
    config = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    return model_class(config_class(**config))


def text_encoder_config(encoder: torch.nn.Module) -> tuple[str, dict]:
    config = encoder.config.to_dict()
    for key in ("architectures", "transformers_version", "_name_or_path"):
        config.pop(key, None)
    return type(encoder).__name__, config


def position_limit(encoder: torch.nn.Module) -> int:
    return int(encoder.config.max_position_embeddings)


def load_tokenizer(vocab_path: str, settings: dict | None = None) -> BertTokenizer:
    """A BertTokenizer from a ``vocab.txt`` file, with ``settings`` (do_lower_case, model_max_length, special
    tokens) as saved in a tokenizer_config.json or our config.json."""
    settings = dict(settings or {})
    kwargs = {key: settings[key] for key in ("do_lower_case", "model_max_length", "unk_token", "sep_token",
                                             "pad_token", "cls_token", "mask_token", "tokenize_chinese_chars",
                                             "strip_accents") if key in settings}
    return BertTokenizer(vocab_path, **kwargs)


def load_tokenizer_folder(folder: str) -> BertTokenizer:
    """A diffusers ``tokenizer/`` folder: ``vocab.txt`` with ``tokenizer_config.json``/``special_tokens_map.json``."""
    settings: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            for key, value in data.items():
                settings[key] = value["content"] if isinstance(value, dict) and "content" in value else value
    vocab = os.path.join(folder, "vocab.txt")
    if os.path.isfile(vocab):
        return load_tokenizer(vocab, settings)
    return BertTokenizer.from_pretrained(folder)


def tokenizer_settings(tokenizer: BertTokenizer) -> dict:
    return {
        "class": "BertTokenizer",
        "do_lower_case": bool(getattr(tokenizer, "do_lower_case", True)),
        "model_max_length": int(tokenizer.model_max_length) if tokenizer.model_max_length < 10**6 else None,
        "unk_token": tokenizer.unk_token, "sep_token": tokenizer.sep_token, "pad_token": tokenizer.pad_token,
        "cls_token": tokenizer.cls_token, "mask_token": tokenizer.mask_token,
    }


def vocab_lines(tokenizer: BertTokenizer) -> str:
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab.items(), key=lambda item: item[1])
    if [index for _, index in ordered] != list(range(len(ordered))):
        raise ValueError("tokenizer vocabulary ids are not contiguous; cannot write vocab.txt")
    return "".join(token + "\n" for token, _ in ordered)


def tokenize(tokenizer: BertTokenizer, prompts: list[str], max_length: int) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids


def encode_tokens(encoder: torch.nn.Module, input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Last hidden states, as diffusers computes ``prompt_embeds``."""
    input_ids = input_ids.to(encoder.device)
    if isinstance(encoder, BertModel) or getattr(encoder.config, "use_attention_mask", False):
        mask = (input_ids != pad_token_id).long() if pad_token_id is not None else None
        return encoder(input_ids, attention_mask=mask)[0]
    return encoder(input_ids)[0]
