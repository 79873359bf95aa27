"""Chinese text encoders behind a ``BertTokenizer`` (Chinese BERT WordPiece ``vocab.txt``): a transformers
``CLIPTextModel`` or ``BertModel``, encoded exactly as diffusers' StableDiffusionPipeline does (padding to the maximum
length, attention mask only where the encoder asks for one), so our images match diffusers'; or EasyNLP's Wukong
text transformer (``WukongTextEncoder``), whose conditioning is pooled, not per token."""

from __future__ import annotations

import json
import os

import torch
from transformers import BertConfig, BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModel

from modelzoo.wukong import WukongTextEncoder

TEXT_ENCODERS = {"CLIPTextModel": (CLIPTextModel, CLIPTextConfig), "BertModel": (BertModel, BertConfig)}
WUKONG = "WukongTextEncoder"


def build_text_encoder(class_name: str, config: dict) -> torch.nn.Module:
    if class_name == WUKONG:  # a diffusers config (exported folder) also holds _class_name, _diffusers_version
        return WukongTextEncoder(**{k: v for k, v in config.items() if not k.startswith("_")})
    if class_name not in TEXT_ENCODERS:
        raise ValueError(f"text encoder class {class_name} is not supported (use {', '.join(TEXT_ENCODERS)}, "
                         f"{WUKONG})")
    model_class, config_class = TEXT_ENCODERS[class_name]
    config = {k: v for k, v in config.items() if k not in ("architectures", "transformers_version", "_name_or_path")}
    return model_class(config_class(**config))


def text_encoder_config(encoder: torch.nn.Module) -> tuple[str, dict]:
    if isinstance(encoder, WukongTextEncoder):
        return WUKONG, dict(encoder.settings)
    config = encoder.config.to_dict()
    for key in ("architectures", "transformers_version", "_name_or_path"):
        config.pop(key, None)
    return type(encoder).__name__, config


def position_limit(encoder: torch.nn.Module) -> int:
    if isinstance(encoder, WukongTextEncoder):
        return encoder.context_length
    return int(encoder.config.max_position_embeddings)


def load_tokenizer(vocab_path: str, settings: dict | None = None) -> BertTokenizer:
    """A BertTokenizer from a ``vocab.txt`` file, with ``settings`` (do_lower_case, model_max_length, special
    tokens) as saved in a tokenizer_config.json or our config.json."""
    settings = dict(settings or {})
    kwargs = {key: settings[key] for key in ("do_lower_case", "model_max_length", "unk_token", "sep_token",
                                             "pad_token", "cls_token", "mask_token", "tokenize_chinese_chars",
                                             "strip_accents", "split_special_tokens") if key in settings}
    tokenizer = BertTokenizer(vocab_path, **kwargs)
    if settings.get("max_input_chars_per_word"):  # longer words become [UNK]; the constructor ignores this one
        tokenizer.backend_tokenizer.model.max_input_chars_per_word = int(settings["max_input_chars_per_word"])
    return tokenizer


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
    fast = os.path.join(folder, "tokenizer.json")
    if "max_input_chars_per_word" not in settings and os.path.isfile(fast):  # EasyNLP's 200 lives only there
        with open(fast, encoding="utf-8") as handle:
            wordpiece = json.load(handle).get("model") or {}
        if wordpiece.get("max_input_chars_per_word"):
            settings["max_input_chars_per_word"] = wordpiece["max_input_chars_per_word"]
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
    } | wordpiece_settings(tokenizer)


# transformers' defaults; EasyNLP's own BERT tokenizer (Wukong) differs in both (see wukong_tokenizer_settings).
WORDPIECE_DEFAULTS = {"split_special_tokens": False, "max_input_chars_per_word": 100}


def wordpiece_settings(tokenizer: BertTokenizer) -> dict:
    """The settings where ``tokenizer`` differs from transformers' defaults (so other models' configs keep theirs)."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    values = {"split_special_tokens": bool(getattr(tokenizer, "split_special_tokens", False)),
              "max_input_chars_per_word": int(getattr(model, "max_input_chars_per_word", 100))}
    return {key: value for key, value in values.items() if value != WORDPIECE_DEFAULTS[key]}


def wukong_tokenizer_settings(max_length: int) -> dict:
    """EasyNLP's ``FullTokenizer`` (bert_tokenizer.py): lower-cased, accents stripped, Chinese characters split, text
    like "[SEP]" tokenised as text (never as a special token), words up to 200 characters before [UNK]."""
    return {"do_lower_case": True, "model_max_length": int(max_length), "split_special_tokens": True,
            "max_input_chars_per_word": 200}


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
    """Last hidden states, as diffusers computes ``prompt_embeds`` (Wukong: its pooled, repeated conditioning)."""
    input_ids = input_ids.to(encoder.device)
    if isinstance(encoder, WukongTextEncoder):
        return encoder(input_ids)[0]
    if isinstance(encoder, BertModel) or getattr(encoder.config, "use_attention_mask", False):
        mask = (input_ids != pad_token_id).long() if pad_token_id is not None else None
        return encoder(input_ids, attention_mask=mask)[0]
    return encoder(input_ids)[0]
