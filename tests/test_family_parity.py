"""Each new MoE family (``quantkit.model.arch``) against transformers' own implementation: models built and saved by
transformers (Hub layout, per-expert names), loaded by ``quantkit.load``; fp32 logits within 1e-4 and identical
greedy generations with the KV cache."""

import pytest
from hf_families import make_family_model
from parity_check import assert_matches_transformers

import quantkit

CASES = {
    "qwen3_moe": [{},
                  {"num_experts": 6, "num_experts_per_tok": 3, "norm_topk_prob": False, "mlp_only_layers": [0], "tie_word_embeddings": True},
                  {"num_experts": 5, "num_experts_per_tok": 1, "decoder_sparse_step": 2, "attention_bias": True}],
    "qwen2_moe": [{},
                  {"num_experts": 6, "num_experts_per_tok": 3, "norm_topk_prob": True, "mlp_only_layers": [1], "qkv_bias": False},
                  {"decoder_sparse_step": 2, "tie_word_embeddings": True, "num_key_value_heads": 4}],
    "mixtral": [{},
                {"num_local_experts": 6, "num_experts_per_tok": 3, "tie_word_embeddings": True},
                {"num_local_experts": 3, "num_experts_per_tok": 1, "num_key_value_heads": 1, "head_dim": 16}],
    "olmoe": [{},
              {"num_experts": 6, "num_experts_per_tok": 3, "norm_topk_prob": True, "attention_bias": True},
              {"num_experts_per_tok": 1, "tie_word_embeddings": True, "num_key_value_heads": 4}],
    "glm4_moe": [{},
                 {"use_qk_norm": True, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 3, "first_k_dense_replace": 0,
                  "attention_bias": False},
                 {"n_shared_experts": 2, "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "first_k_dense_replace": 2,
                  "partial_rotary_factor": 1.0, "tie_word_embeddings": True, "routed_scaling_factor": 1.0}],
}
PARAMS = [(f, i, cfg) for f, cases in CASES.items() for i, cfg in enumerate(cases)]


@pytest.mark.parametrize("family,i,cfg", PARAMS, ids=[f"{f}-{i}" for f, i, _ in PARAMS])
def test_family_logits_and_greedy_match_transformers(tmp_path, family, i, cfg):
    ref = make_family_model(family, seed=i, **cfg)
    sharded = i == 1  # every family is also read from a sharded save
    ref.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "1GB")
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    ours = quantkit.load(tmp_path, dtype="float32")
    assert ours.config.arch == family

    assert_matches_transformers(ref, ours)
