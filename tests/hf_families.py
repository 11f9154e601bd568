"""Build and save transformers' own implementations of the MoE families (the independent references) from tiny
configs, with weights large enough that routing and attention matter (as ``hf_reference.py`` does for ERNIE)."""

import torch
from hf_reference import randomize

BASE = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "eos_token_id": None, "pad_token_id": None, "bos_token_id": None}

# family -> (config class, model class, tiny defaults)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  {"head_dim": 8, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"moe_intermediate_size": 16, "shared_expert_intermediate_size": 24, "num_experts": 4, "num_experts_per_tok": 2}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"intermediate_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              {"intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2}),
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 {"head_dim": 16, "moe_intermediate_size": 16, "n_routed_experts": 8, "num_experts_per_tok": 2,
                  "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5, "attention_bias": True}),
}


def make_family_model(family: str, seed: int = 0, **overrides):
    import transformers

    cfg_cls, model_cls, tiny = FAMILIES[family]
    kw = dict(BASE, **tiny)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, cfg_cls)(**kw)).eval()
    return randomize(model, with_buffers=True)
