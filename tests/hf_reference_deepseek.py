"""Build and save transformers' DeepseekV3ForCausalLM and Glm4MoeForCausalLM (the independent references for the
DeepSeek-V3 and GLM-4.5 whole-model parity tests) from tiny configs, and read back the tensor names they write.

    model = make_deepseek_model("groups")            # a named variant of DEEPSEEK_TINY (or overrides=...)
    path = save(model, tmp_path / "ds", shard="20KB")  # save_pretrained, optionally sharded
    name_patterns(on_disk_names(path))                # {'model.layers.{L}.mlp.experts.{e}.gate_proj.weight', ...}
"""

import json
import re
from pathlib import Path

import torch

DEEPSEEK_TINY = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
                 "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 16,
                 "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
                 "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "n_shared_experts": 1,
                 "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                 "tie_word_embeddings": False, "max_position_embeddings": 64, "bos_token_id": None,
                 "eos_token_id": None, "pad_token_id": None}
# transformers always builds DeepSeek's / GLM's shared experts (intermediate moe_intermediate_size * n_shared_experts):
# "none" is not a variant these families have
DEEPSEEK_VARIANTS = {
    "base": {},
    "no-q-lora": {"q_lora_rank": None},  # DeepSeek-V2-Lite: q_proj instead of q_a/q_b
    "all-moe": {"first_k_dense_replace": 0},
    "dense-first-2": {"first_k_dense_replace": 2, "n_shared_experts": 2},
    "no-groups": {"n_group": 1, "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0},
    "wide-groups": {"n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 8, "topk_group": 3},
    "tied": {"tie_word_embeddings": True},
    "rotate-half": {"rope_interleave": False, "qk_rope_head_dim": 16, "v_head_dim": 12},
    "yarn": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                                 "mscale": 1.0, "mscale_all_dim": 1.0}},
}
GLM_TINY = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
            "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
            "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True, "attention_bias": True,
            "use_qk_norm": False, "tie_word_embeddings": False, "max_position_embeddings": 64, "bos_token_id": None,
            "eos_token_id": None, "pad_token_id": None}
GLM_VARIANTS = {
    "base": {},  # GLM-4.5: q/k/v bias, rotate-half RoPE on the first half of each head (partial_rotary_factor 0.5)
    "qk-norm": {"use_qk_norm": True},
    "groups": {"n_group": 4, "topk_group": 2},
    "tied-all-moe": {"tie_word_embeddings": True, "first_k_dense_replace": 0},
}


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights large enough that routing and attention matter; a correction bias that changes choices."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "inv_freq" in name:
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype)
            if "e_score_correction_bias" in name:
                t.copy_(0.05 * noise)
            elif "norm" in name:
                t.copy_(1 + 0.1 * noise)
            else:
                t.copy_(0.2 * noise)
    return model.eval()


def deepseek_config(variant: str = "base", **overrides):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**(DEEPSEEK_TINY | DEEPSEEK_VARIANTS[variant] | overrides))


def make_deepseek_model(variant: str = "base", seed: int = 0, **overrides):
    from transformers import DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    return _randomize(DeepseekV3ForCausalLM(deepseek_config(variant, **overrides)), seed)


def glm_config(variant: str = "base", **overrides):
    from transformers import Glm4MoeConfig

    return Glm4MoeConfig(**(GLM_TINY | GLM_VARIANTS[variant] | overrides))


def make_glm_model(variant: str = "base", seed: int = 0, **overrides):
    from transformers import Glm4MoeForCausalLM

    torch.manual_seed(seed)
    return _randomize(Glm4MoeForCausalLM(glm_config(variant, **overrides)), seed)


def save(model, path: Path, shard: str | None = None) -> Path:
    """``save_pretrained`` (safetensors), sharded at ``shard`` (e.g. '20KB') when given."""
    path = Path(path)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return path


def on_disk_names(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor in a saved checkpoint: name -> (shape, safetensors dtype), over all shards."""
    from safetensors import safe_open

    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(path / name, "pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                s = f.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype())
    return out


def name_patterns(names) -> set[str]:
    """Names with the layer index as {L} and the expert index as {e}."""
    return {re.sub(r"\.experts\.\d+\.", ".experts.{e}.", re.sub(r"^model\.layers\.\d+\.", "model.layers.{L}.", n))
            for n in names}
