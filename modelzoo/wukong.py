"""EasyNLP's Wukong text transformer (``FrozenWukongCLIPTextEmbedder`` around Wukong's ``TextTransformer``) as a
diffusers model (``ModelMixin``/``ConfigMixin``: ``save_pretrained`` writes ``config.json`` and
``diffusion_pytorch_model.safetensors``, ``from_pretrained`` reads them).

This file imports only torch and diffusers: ``--mode=export export_format=diffusers`` copies it into the exported
``text_encoder/`` folder as ``wukong.py`` (``model_index.json``: ``["wukong", "WukongTextEncoder"]``), so that
``StableDiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`` loads the folder where this toolkit is
not installed. This toolkit itself never runs a model folder's code: its loader builds this class by name.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin


class _QuickGELU(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


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


class _Transformer(torch.nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = torch.nn.ModuleList(_ResidualAttentionBlock(width, heads) for _ in range(layers))


class WukongTextEncoder(ModelMixin, ConfigMixin):
    """A causal CLIP-style transformer over token embeddings + learned positions; the output at the [SEP] token (id
    ``sep_token_id``, 102 in EasyNLP's code) after the final LayerNorm, projected, L2-normalised (``normalize``) and
    repeated ``n_repeat`` times → ``(batch, n_repeat, output_dim)``. Parameter names are EasyNLP's
    (``cond_stage_model.model.*`` without the prefix). Causal attention makes the [SEP] output independent of what
    follows it, so padding ids do not matter (``attention_mask``, which diffusers' pipelines may pass, is not
    needed); inputs shorter than ``context_length`` are padded with 0 as EasyNLP's tokenizer does."""

    @register_to_config
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
        # Initialised in place: diffusers' from_pretrained turns torch.nn.init's functions into no-ops returning None.
        self.embedding_table = torch.nn.Parameter(torch.empty(vocab_size, width))
        torch.nn.init.trunc_normal_(self.embedding_table, std=0.02)
        self.positional_embedding = torch.nn.Parameter(torch.empty(context_length, width))
        torch.nn.init.trunc_normal_(self.positional_embedding, std=0.01)
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

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor]:
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
