"""DeepSeek-V3 (``DeepseekV3ForCausalLM``; Kimi-K2 has the same layout): multi-head latent attention
(``quantkit.model.mla``: q_a/q_b or q_proj, kv_a_proj_with_mqa, kv_b_proj, yarn RoPE; its keys read by
``MlaConfig.from_hf``), dense layers before ``first_k_dense_replace`` and MoE where ``idx % moe_layer_freq == 0``
(vLLM's rule), sigmoid group-limited router with a correction bias (Hub ``mlp.gate.e_score_correction_bias``,
``[E]``) and a routed scaling factor, plain shared experts of width ``moe_intermediate_size * n_shared_experts``.
The MTP layer at index ``num_hidden_layers`` is ignored. ``rope_style`` 'half' is the layout of MLA's cos/sin tables
(the interleaved weights are de-interleaved in the layer)."""

from quantkit.model.arch.spec import ArchSpec, per_expert

SPEC = ArchSpec(
    name="deepseek_v3", architectures=("DeepseekV3ForCausalLM",), model_type="deepseek_v3", attention="mla",
    fused=(("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj")),  # vLLM: fused_qkv_a_proj, gate_up_proj
    config_keys=(("moe_num_experts", "n_routed_experts"), ("moe_k", "num_experts_per_tok"),
                 ("moe_num_shared_experts", "n_shared_experts"), ("moe_layer_start_index", "first_k_dense_replace"),
                 ("head_dim", "qk_rope_head_dim")),
    defaults=(("rms_norm_eps", 1e-6), ("rope_theta", 10000.0), ("tie_word_embeddings", False),
              ("moe_num_shared_experts", 1), ("moe_layer_start_index", 3), ("norm_topk_prob", True),
              ("routed_scaling_factor", 2.5), ("max_position_embeddings", 4096)),
    fixed=(("rope_style", "half"), ("router_scoring", "sigmoid"), ("router_bias", True), ("moe_norm_min", 0.0)),
    required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
    unsupported=(("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("hidden_act", "silu")),
    names=per_expert("mlp.experts") + (("mlp.moe_statics.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),),
    router_bias_rank=1, extra_layers_ignored=True, rope_types=("default", "yarn"),
)
