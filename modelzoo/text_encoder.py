"""Chinese text encoders behind a ``BertTokenizer`` (Chinese BERT WordPiece ``vocab.txt``): a transformers
``CLIPTextModel`` or ``BertModel``, encoded exactly as diffusers' StableDiffusionPipeline does (padding to the maximum
length, attention mask only where the encoder asks for one), so our images match diffusers'; or EasyNLP's Wukong
text transformer (``WukongTextEncoder``), whose conditioning is pooled, not per token."""

from __future__ import annotations

import json
import os
from collections import OrderedDict

import torch
from transformers import BertConfig, BertModel, BertTokenizer, CLIPTextConfig, CLIPTextModel

TEXT_ENCODERS = {"CLIPTextModel": (CLIPTextModel, CLIPTextConfig), "BertModel": (BertModel, BertConfig)}
WUKONG = "WukongTextEncoder"


class _ResidualAttentionBlock(torch.nn.Module):
    """CLIP's pre-LayerNorm block as Wukong has it (LayerNorm eps 1e-7, QuickGELU); parameter names as EasyNLP's."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_1 = torch.nn.LayerNorm(width, eps=1e-07)
        self.mlp = torch.nn.Sequential(OrderedDict([("c_fc", torch.nn.Linear(width, width * 4)),
                                                    ("gelu", _QuickGELU()),
                                                    ("c_proj", torch.nn.Linear(width * 4, width))]))
        self.ln_2 = torch.nn.LayerNorm(width, eps=1e-07)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask.to(x.dtype))[0]
        return x + self.mlp(self.ln_2(x))


class _QuickGELU(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Transformer(torch.nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = torch.nn.ModuleList(_ResidualAttentionBlock(width, heads) for _ in range(layers))


class WukongTextEncoder(torch.nn.Module):
    """EasyNLP's conditioning (``FrozenWukongCLIPTextEmbedder`` around Wukong's ``TextTransformer``): a causal
    CLIP-style transformer over token embeddings + learned positions; the output at the [SEP] token (id
    ``sep_token_id``, 102 in EasyNLP's code) after the final LayerNorm, projected, L2-normalised (``normalize``) and
    repeated ``n_repeat`` times → ``(batch, n_repeat, output_dim)``. Parameter names are EasyNLP's
    (``cond_stage_model.model.*`` without the prefix). Causal attention makes the [SEP] output independent of what
    follows it, so padding ids do not matter; inputs shorter than ``context_length`` are padded with 0 as
    EasyNLP's tokenizer does."""

    def __init__(self, context_length: int, vocab_size: int, output_dim: int, width: int, layers: int, heads: int,
                 n_repeat: int = 1, normalize: bool = True, sep_token_id: int = 102):
        super().__init__()
        self.settings = {"context_length": int(context_length), "vocab_size": int(vocab_size),
                         "output_dim": int(output_dim), "width": int(width), "layers": int(layers),
                         "heads": int(heads), "n_repeat": int(n_repeat), "normalize": bool(normalize),
                         "sep_token_id": int(sep_token_id)}
        self.transformer = _Transformer(width, layers, heads)
        self.text_projection = torch.nn.Parameter(torch.randn(width, output_dim) * width ** -0.5)
        self.ln_final = torch.nn.LayerNorm(width, eps=1e-07)
        self.embedding_table = torch.nn.Parameter(torch.nn.init.trunc_normal_(torch.empty(vocab_size, width),
                                                                              std=0.02))
        self.positional_embedding = torch.nn.Parameter(
            torch.nn.init.trunc_normal_(torch.empty(context_length, width), std=0.01))
        mask = torch.full((context_length, context_length), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask, persistent=False)

    @property
    def device(self) -> torch.device:
        return self.embedding_table.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embedding_table.dtype

    @property
    def context_length(self) -> int:
        return self.settings["context_length"]

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        batch, length = input_ids.shape
        if length > self.context_length:
            raise ValueError(f"{length} tokens exceed the Wukong encoder's {self.context_length} positions")
        if length < self.context_length:
            input_ids = torch.nn.functional.pad(input_ids, (0, self.context_length - length))
        sep = input_ids == self.settings["sep_token_id"]
        if not bool((sep.sum(dim=1) == 1).all()):
            raise ValueError("every prompt needs exactly one [SEP] token (id "
                             f"{self.settings['sep_token_id']}), as EasyNLP's tokenisation writes")
        x = self.embedding_table[input_ids] + self.positional_embedding
        x = x.permute(1, 0, 2)
        for block in self.transformer.resblocks:
            x = block(x, self.causal_mask)
        x = self.ln_final(x.permute(1, 0, 2))
        pooled = x[sep] @ self.text_projection
        if self.settings["normalize"]:
            pooled = pooled / torch.linalg.norm(pooled, dim=1, keepdim=True)
        return (pooled[:, None, :].expand(-1, self.settings["n_repeat"], -1).contiguous(),)


def build_text_encoder(class_name: str, config: dict) -> torch.nn.Module:
    if class_name == WUKONG:
        return WukongTextEncoder(**config)
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
