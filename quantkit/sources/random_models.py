"""Random-weight ERNIE-4.5-MoE checkpoints written in the Hub layout (for tests and measurements).

``ernie-tiny``: a few MB, every feature on (dense layer, MoE layers, shared experts, routing bias).
``ernie-21b-a3b``: ERNIE-4.5-21B-A3B's real dimensions with N decoder layers, sharded.
Weights are drawn layer by layer from a seeded generator and flushed shard by shard, so writing
needs memory for about one shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantkit.format.writer import ShardWriter
from quantkit.model.config import MoeConfig

RANDOM_VERSION = 1

ERNIE_TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
    moe_intermediate_size=32, moe_layer_start_index=1, max_position_embeddings=4096,
)
ERNIE_21B_A3B = dict(
    vocab_size=103424, hidden_size=2560, intermediate_size=12288, num_hidden_layers=28, num_attention_heads=20,
    num_key_value_heads=4, head_dim=128, moe_num_experts=64, moe_k=6, moe_num_shared_experts=2,
    moe_intermediate_size=1536, moe_layer_start_index=1, max_position_embeddings=131072,
)


def hf_config(dims: dict, dtype: str) -> dict:
    """A complete ``config.json`` dict for the given dimensions."""
    return {
        "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe",
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "tie_word_embeddings": True, "use_bias": False, "moe_layer_end_index": dims["num_hidden_layers"] - 1,
        "moe_layer_interval": 1, "moe_norm_min": 1e-12, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": dtype, **dims,
    }


def layer_tensors(cfg: MoeConfig, idx: int, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Hub-layout tensors of decoder layer ``idx`` drawn from ``gen``."""
    H, D = cfg.hidden_size, cfg.head_dim
    p = f"model.layers.{idx}"

    def w(n, k, std=0.02):
        return (torch.randn(n, k, generator=gen) * std).to(dtype)

    def norm():
        return (1.0 + 0.1 * torch.randn(H, generator=gen)).to(dtype)

    t = {
        f"{p}.input_layernorm.weight": norm(),
        f"{p}.post_attention_layernorm.weight": norm(),
        f"{p}.self_attn.q_proj.weight": w(cfg.num_attention_heads * D, H),
        f"{p}.self_attn.k_proj.weight": w(cfg.num_key_value_heads * D, H),
        f"{p}.self_attn.v_proj.weight": w(cfg.num_key_value_heads * D, H),
        f"{p}.self_attn.o_proj.weight": w(H, cfg.num_attention_heads * D),
    }
    if not cfg.is_moe_layer(idx):
        I = cfg.intermediate_size
        t.update({f"{p}.mlp.gate_proj.weight": w(I, H), f"{p}.mlp.up_proj.weight": w(I, H), f"{p}.mlp.down_proj.weight": w(H, I)})
        return t
    E, I = cfg.moe_num_experts, cfg.moe_intermediate_size
    t[f"{p}.mlp.gate.weight"] = torch.randn(E, H, generator=gen) * 0.5 / H**0.5  # fp32, spread-out probs
    t[f"{p}.mlp.moe_statics.e_score_correction_bias"] = 0.02 * torch.randn(1, E, generator=gen)
    if cfg.moe_num_shared_experts:
        S = I * cfg.moe_num_shared_experts
        for name, shape in (("gate_proj", (S, H)), ("up_proj", (S, H)), ("down_proj", (H, S))):
            t[f"{p}.mlp.shared_experts.{name}.weight"] = w(*shape)
    for e in range(E):
        for name, shape in (("gate_proj", (I, H)), ("up_proj", (I, H)), ("down_proj", (H, I))):
            t[f"{p}.mlp.experts.{e}.{name}.weight"] = w(*shape)
    return t


def write_random_checkpoint(out: Path, dims: dict, *, seed: int, dtype: str, max_shard_bytes: int, progress=None) -> None:
    """Write config.json, weights and a byte-level tokenizer for a random ERNIE-4.5-MoE into ``out``."""
    from quantkit.sources.byte_tokenizer import write_byte_tokenizer

    config = hf_config(dims, dtype)
    cfg = MoeConfig.from_dict(config)
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(out, max_shard_bytes)
    writer.add("model.embed_tokens.weight", (torch.randn(cfg.vocab_size, cfg.hidden_size, generator=gen) * 0.02).to(tdtype))
    for idx in range(cfg.num_hidden_layers):
        for name, t in layer_tensors(cfg, idx, gen, tdtype).items():
            writer.add(name, t)
        if progress:
            progress(idx + 1, cfg.num_hidden_layers)
    writer.add("model.norm.weight", (1.0 + 0.1 * torch.randn(cfg.hidden_size, generator=gen)).to(tdtype))
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_byte_tokenizer(out, bos_id=1, eos_id=2, pad_id=0)
