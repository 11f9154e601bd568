"""Random-weight checkpoints of the non-ERNIE families, written in each family's Hub layout and config.json.

``<family>-tiny`` (``qwen3-moe-tiny``, ``qwen2-moe-tiny``, ``mixtral-tiny``, ``olmoe-tiny``, ``glm4-moe-tiny``,
``deepseek-v3-tiny``: multi-head latent attention with q_lora, yarn RoPE): a few
MB each, every feature of the family on (dense-first layers where the family has them, shared experts, q/k norms,
biases, the correction bias). The tensors are the model's canonical parameters (a meta-device skeleton), drawn
layer by layer from a seeded generator and named on disk through the family's name map (``arch.spec.hub_tensors``),
so the writer, the loader and these sources agree by construction. ERNIE's keep ``random_models.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from quantkit.format.writer import ShardWriter
from quantkit.model.arch import get_spec
from quantkit.model.config import MoeConfig

RANDOM_FAMILIES_VERSION = 1
_COMMON = {
    "vocab_size": 320, "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
# source name -> (ArchSpec name, the family's config.json keys beyond _COMMON)
TINY = {
    "qwen3-moe-tiny": ("qwen3_moe", {
        "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [0], "attention_bias": False, "use_sliding_window": False}),
    "qwen2-moe-tiny": ("qwen2_moe", {
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
        "norm_topk_prob": False, "qkv_bias": True, "decoder_sparse_step": 1, "mlp_only_layers": [0],
        "use_sliding_window": False}),
    "mixtral-tiny": ("mixtral", {
        "head_dim": 16, "intermediate_size": 32, "num_local_experts": 8, "num_experts_per_tok": 2, "sliding_window": None,
        "rms_norm_eps": 1e-5}),
    "olmoe-tiny": ("olmoe", {
        "intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": False,
        "attention_bias": False, "clip_qkv": None, "rms_norm_eps": 1e-5}),
    "glm4-moe-tiny": ("glm4_moe", {
        "head_dim": 16, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 32,
        "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "attention_bias": True, "use_qk_norm": True, "num_nextn_predict_layers": 0, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5}}),
    "deepseek-v3-tiny": ("deepseek_v3", dict(
        num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
        moe_intermediate_size=32, first_k_dense_replace=1, moe_layer_freq=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc", rope_interleave=True,
        attention_bias=False, num_nextn_predict_layers=0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 1024,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})),
}


def family_config(source: str, dtype: str, layers: int | None = None) -> dict:
    """The complete config.json of a tiny family source, or of a real-dimension one (``REAL``) with ``layers``
    decoder layers."""
    arch, keys = TINY[source] if source in TINY else REAL[source]
    spec = get_spec(arch)
    extra = {} if layers is None else {"num_hidden_layers": layers}
    return {"architectures": [spec.architectures[0]], "model_type": spec.model_type, **_COMMON, **keys, **extra,
            "torch_dtype": dtype}


def _draw(name: str, shape: tuple[int, ...], gen: torch.Generator, hidden: int) -> torch.Tensor:
    """One canonical parameter's random values (fp32) by its role."""
    if name.endswith("mlp.gate.weight"):  # the router: spread-out scores
        return torch.randn(shape, generator=gen) * 0.5 / hidden**0.5
    if name.endswith(("e_score_correction_bias", ".bias")):
        return 0.02 * torch.randn(shape, generator=gen)
    if "norm" in name:
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return torch.randn(shape, generator=gen) * 0.02


def write_family_checkpoint(out: Path, source: str, *, seed: int, dtype: str, max_shard_bytes: int,
                            layers: int | None = None) -> None:
    """Write config.json, weights (Hub names, per expert) and a byte-level tokenizer for ``source`` into ``out``
    (``layers``: the decoder layers of a real-dimension source). One parameter is drawn at a time."""
    from quantkit.model.causal_lm import MoeForCausalLM
    from quantkit.model.loader import FP32_PARAMS, model_tensors, source_names
    from quantkit.sources.byte_tokenizer import write_byte_tokenizer

    config = family_config(source, dtype, layers)
    cfg = MoeConfig.from_dict(config)
    tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    with torch.device("meta"):
        skeleton = MoeForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(out, max_shard_bytes)
    for name, p in model_tensors(skeleton):
        t = _draw(name, tuple(p.shape), gen, cfg.hidden_size)
        t = t if FP32_PARAMS.search(name) else t.to(tdtype)
        disk = source_names(name, cfg)
        for d, part in zip(disk, [t] if len(disk) == 1 else list(t)):
            writer.add(d, part.contiguous())
    writer.close()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_byte_tokenizer(out, bos_id=1, eos_id=2, pad_id=0)


# Real dimensions, each from that model's Hub config.json, for the memory benchmark (``random:<name>?layers=N``,
# bf16, sharded): the number of layers is the only thing cut.
_ROPE = {"rope_type": "default", "rope_theta": 1000000.0}
REAL = {
    "qwen3-30b-a3b": ("qwen3_moe", dict(  # Qwen/Qwen3-30B-A3B
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960, attention_bias=False,
        use_sliding_window=False)),
    "qwen1.5-moe-a2.7b": ("qwen2_moe", dict(  # Qwen/Qwen1.5-MoE-A2.7B
        vocab_size=151936, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16, num_experts=60,
        num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
        max_position_embeddings=8192, use_sliding_window=False)),
    "mixtral-8x7b": ("mixtral", dict(  # mistralai/Mixtral-8x7B-v0.1
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
        sliding_window=None)),
    "olmoe-1b-7b": ("olmoe", dict(  # allenai/OLMoE-1B-7B-0924
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, attention_bias=False, clip_qkv=None,
        rms_norm_eps=1e-5, max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "glm4.5-air": ("glm4_moe", dict(  # zai-org/GLM-4.5-Air
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, n_routed_experts=128, num_experts_per_tok=8,
        n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=1.0,
        norm_topk_prob=True, attention_bias=True, use_qk_norm=False, num_nextn_predict_layers=0, rms_norm_eps=1e-5,
        max_position_embeddings=131072, rope_parameters={**_ROPE, "partial_rotary_factor": 0.5})),
    "deepseek-v2-lite": ("deepseek_v2", {  # deepseek-ai/DeepSeek-V2-Lite
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944, "moe_intermediate_size": 1408,
        "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
        "num_experts_per_tok": 6, "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "routed_scaling_factor": 1.0, "topk_method": "greedy", "n_group": 1, "topk_group": 1, "norm_topk_prob": False,
        "max_position_embeddings": 163840, "rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}),
}
