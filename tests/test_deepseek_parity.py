"""DeepSeek-V3 (``quantkit.model.arch.deepseek_v3``, multi-head latent attention) against transformers'
``DeepseekV3ForCausalLM``: tiny models built and saved by transformers (``hf_reference_deepseek``), loaded by
``quantkit.load``; fp32 logits within 1e-4 and identical greedy generations with the KV cache. Also the layer
kinds (vLLM's ``moe_layer_freq`` rule), the MTP layer ignored, and a config lacking a key the spec needs."""

import json

import pytest
import torch
from hf_reference_deepseek import DEEPSEEK_VARIANTS, make_deepseek_model, save
from parity_check import assert_matches_transformers

import quantkit
from quantkit.errors import UsageError
from quantkit.model.config import MoeConfig
from quantkit.model.mla import MultiHeadLatentAttention

SHARDED = {"base", "no-q-lora", "yarn"}  # also read from a sharded save


@pytest.mark.parametrize("variant", sorted(DEEPSEEK_VARIANTS))
def test_deepseek_logits_and_greedy_match_transformers(tmp_path, variant):
    ref = make_deepseek_model(variant, seed=len(variant))
    save(ref, tmp_path, shard="20KB" if variant in SHARDED else None)
    assert (tmp_path / "model.safetensors.index.json").exists() == (variant in SHARDED)
    ours = quantkit.load(tmp_path, dtype="float32")
    assert ours.config.arch == "deepseek_v3"
    assert all(isinstance(layer.self_attn, MultiHeadLatentAttention) for layer in ours.model.layers)
    assert [layer.is_moe for layer in ours.model.layers] == [not hasattr(layer.mlp, "gate_proj") for layer in ref.model.layers]

    assert_matches_transformers(ref, ours)


def _config(**changes) -> dict:
    d = make_deepseek_model("base").config.to_dict()
    d.update(changes)
    return {k: v for k, v in d.items() if v is not None or k in ("q_lora_rank",)}


def test_layer_kinds_follow_vllms_rule():
    """MoE where idx >= first_k_dense_replace and idx % moe_layer_freq == 0 (vLLM's deepseek_v2.py)."""
    cfg = MoeConfig.from_dict(_config(num_hidden_layers=7, first_k_dense_replace=1, moe_layer_freq=2))
    assert cfg.moe_layers == [2, 4, 6]
    assert MoeConfig.from_dict(_config(num_hidden_layers=4, first_k_dense_replace=1)).moe_layers == [1, 2, 3]


def test_mtp_layer_is_ignored(tmp_path):
    """DeepSeek-V3 checkpoints carry an MTP layer at index num_hidden_layers: present on disk, never read."""
    from safetensors.torch import load_file, save_file

    ref = make_deepseek_model("base")
    save(ref, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    n = ref.config.num_hidden_layers
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(4, 4)
    tensors[f"model.layers.{n}.self_attn.kv_b_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert (quantkit.load(tmp_path, dtype="float32")(ids) - ref(ids).logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("key", ["kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "n_routed_experts"])
def test_config_lacking_a_required_key_names_it(tmp_path, key):
    d = _config()
    del d[key]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(UsageError, match=f"lacks the required key '{key}'"):
        MoeConfig.from_dir(tmp_path)


def test_unsupported_router_and_rope_are_refused():
    with pytest.raises(UsageError, match="topk_method"):
        MoeConfig.from_dict(_config(topk_method="group_limited_greedy"))
    with pytest.raises(UsageError, match="rope.type 'dynamic' is not supported"):
        MoeConfig.from_dict(_config(rope_parameters=None, rope_scaling={"type": "dynamic", "factor": 2.0}))


# DeepSeek-V2 / V2-Lite: the same model with a softmax 'greedy' router (quantkit.model.arch.deepseek_v2)
V2_TINY = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
           "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": None,
           "kv_lora_rank": 12, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 8,
           "num_experts_per_tok": 2, "n_shared_experts": 2, "first_k_dense_replace": 1, "routed_scaling_factor": 1.0,
           "topk_method": "greedy", "max_position_embeddings": 64, "bos_token_id": None, "eos_token_id": None,
           "pad_token_id": None}
V2_VARIANTS = {
    "lite": {},  # V2-Lite: q_proj, greedy top-k, scaling 1
    "q-lora-scaled": {"q_lora_rank": 16, "routed_scaling_factor": 16.0, "num_experts_per_tok": 3, "mlp_bias": True},
    "yarn-tied-all-moe": {"first_k_dense_replace": 0, "tie_word_embeddings": True,
                          "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                              "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
                                              "mscale": 0.707, "mscale_all_dim": 0.707}},
}


def make_v2_model(variant: str, seed: int = 0):
    from hf_reference_deepseek import _randomize
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(seed)
    return _randomize(DeepseekV2ForCausalLM(DeepseekV2Config(**(V2_TINY | V2_VARIANTS[variant]))), seed)


@pytest.mark.parametrize("variant", sorted(V2_VARIANTS))
def test_deepseek_v2_logits_and_greedy_match_transformers(tmp_path, variant):
    ref = make_v2_model(variant, seed=len(variant))
    sharded = variant == "lite"
    save(ref, tmp_path, shard="20KB" if sharded else None)
    ours = quantkit.load(tmp_path, dtype="float32")
    assert ours.config.arch == "deepseek_v2"
    ids = torch.randint(0, ref.config.vocab_size, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4
    prompt = ids[:1, :6]
    expected_gen = ref.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert ours.generate(prompt, max_new_tokens=12, eos_token_id=[]).tolist() == expected_gen.tolist()


def test_deepseek_v2_group_limited_routing_is_refused():
    d = make_v2_model("lite").config.to_dict() | {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}
    with pytest.raises(UsageError, match="topk_method='group_limited_greedy' is not supported"):
        MoeConfig.from_dict(d)


def test_hub_style_config_json(tmp_path):
    """The Hub's DeepSeek-V3 config.json (``rope_scaling`` with ``type`` instead of transformers 5's
    ``rope_parameters``, ``scoring_func``/``topk_method``, ``moe_layer_freq``, an MTP layer count) reads the same."""
    ref = make_deepseek_model("yarn", seed=3)
    save(ref, tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    d |= {"scoring_func": "sigmoid", "topk_method": "noaux_tc", "moe_layer_freq": 1, "num_nextn_predict_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(d))
    ours = quantkit.load(tmp_path, dtype="float32")
    assert ours.config.mla.yarn is not None and ours.config.mla.yarn.factor == 4.0
    ids = torch.randint(0, ref.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))  # past 16
    with torch.no_grad():
        assert (ours(ids) - ref(ids).logits).abs().max().item() <= 1e-4
