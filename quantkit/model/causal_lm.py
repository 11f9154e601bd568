"""An MoE causal LM of any family in ``quantkit.model.arch`` as a plain ``torch.nn.Module``:
``model(input_ids) -> logits [B, T, V]``. The family's ``ArchSpec.attention`` picks the attention layer from
``ATTENTION_LAYERS`` (DeepSeek-V3's multi-head latent attention is one more entry: 'mla')."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.model.config import MoeConfig
from quantkit.model.layers import (
    MLP,
    Attention,
    KVCache,
    RMSNorm,
    RotaryEmbedding,
    SparseMoeBlock,
)
from quantkit.model.mla import MlaRotaryEmbedding, MultiHeadLatentAttention, mla_linears


class AttentionKind(NamedTuple):
    """One ``ArchSpec.attention`` value: how a layer's attention is built, and its quantizable linears."""

    build: Callable[[MoeConfig, int], nn.Module]  # (cfg, layer_idx) -> the attention module
    linears: Callable[[MoeConfig], list[tuple[str, tuple[int, int]]]]  # cfg -> (name, [N, K]) in checkpoint order


ATTENTION_LAYERS = {
    "gqa": AttentionKind(Attention, Attention.linears),
    "mla": AttentionKind(lambda cfg, idx: MultiHeadLatentAttention(cfg.mla, idx), lambda cfg: mla_linears(cfg.mla)),
}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MoeConfig, idx: int):
        super().__init__()
        self.idx = idx
        self.is_moe = cfg.is_moe_layer(idx)
        self.self_attn = ATTENTION_LAYERS[cfg.spec.attention].build(cfg, idx)
        self.mlp = SparseMoeBlock(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class MoeBody(nn.Module):
    """The ``model.*`` part of the checkpoint: embeddings, decoder layers, final norm."""

    def __init__(self, cfg: MoeConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MoeForCausalLM(nn.Module):
    def __init__(self, cfg: MoeConfig):
        super().__init__()
        self.config = cfg
        self.model = MoeBody(cfg)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = rotary_embedding(cfg)

    # -- pieces the layer-by-layer pipeline calls one at a time ------------------------------------
    def rope(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(torch.arange(start, start + length, device=device))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.model.norm(h)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, weight)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """input_ids [B, T] -> logits [B, T, V]. With ``cache``, positions continue after what it holds."""
        start = cache.length() if cache is not None else 0
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(start, input_ids.shape[1], input_ids.device)
        for layer in self.model.layers:
            h = layer(h, cos, sin, cache)
        return self.logits(h)

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | list[int],
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Greedy (default) or sampled decoding with a KV cache. Returns prompt + new tokens [B, T + n].

        A sequence that produced an EOS token is padded with ``pad_token_id`` from then on; decoding
        stops when every sequence has finished. ``eos_token_id`` defaults to the config's.
        """
        device = self.model.embed_tokens.weight.device
        ids = torch.as_tensor(input_ids, device=device)
        if ids.dim() == 1:
            ids = ids[None]
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        eos_ids = torch.tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), device=device)
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
        cache = KVCache(self.config.num_hidden_layers)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
        step_input = ids
        for _ in range(max_new_tokens):
            logits = self(step_input, cache)[:, -1].float()
            nxt = _sample(logits, do_sample, temperature, top_k, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            done |= torch.isin(nxt, eos_ids)
            if bool(done.all()):
                break
            step_input = nxt[:, None]
        return ids


def rotary_embedding(cfg: MoeConfig) -> RotaryEmbedding | MlaRotaryEmbedding:
    """The cos/sin tables of a config: its rotary dims, theta and style (MLA: its rope dims, yarn-scaled if set)."""
    if cfg.spec.attention == "mla":
        return MlaRotaryEmbedding(cfg.mla)
    return RotaryEmbedding(cfg.rotary_dim, cfg.rope_theta, cfg.rope_style)


ErnieMoeForCausalLM = MoeForCausalLM  # the name before the architecture specs (issue 14)


def _sample(logits, do_sample, temperature, top_k, top_p, generator) -> torch.Tensor:
    """logits [B, V] fp32 -> next token ids [B]."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)
