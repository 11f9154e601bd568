"""DeepSeek-V2 / V2-Lite (``DeepseekV2ForCausalLM``): DeepSeek-V3's layout and multi-head latent attention (its RoPE
rotates interleaved pairs as complex numbers: the same q.k as V3's ``rope_interleave``), with a softmax router and
``topk_method`` 'greedy' (plain top-k, never renormalised, times ``routed_scaling_factor``; transformers 5.24 ignores
``norm_topk_prob``), no correction bias, an optional MLP bias. V2's 'group_limited_greedy' (groups scored by their
best expert) is not a ``RouterSpec`` variant: refused."""

from quantkit.model.arch.spec import ArchSpec, per_expert

SPEC = ArchSpec(
    name="deepseek_v2", architectures=("DeepseekV2ForCausalLM",), model_type="deepseek_v2", attention="mla",
    fused=(("q_a_proj", "kv_a_proj_with_mqa"), ("gate_proj", "up_proj")),  # vLLM: fused_qkv_a_proj, gate_up_proj
    config_keys=(("moe_num_experts", "n_routed_experts"), ("moe_k", "num_experts_per_tok"),
                 ("moe_num_shared_experts", "n_shared_experts"), ("moe_layer_start_index", "first_k_dense_replace"),
                 ("head_dim", "qk_rope_head_dim")),
    defaults=(("rms_norm_eps", 1e-6), ("rope_theta", 10000.0), ("tie_word_embeddings", False),
              ("moe_num_shared_experts", 2), ("moe_layer_start_index", 0), ("max_position_embeddings", 2048)),
    fixed=(("rope_style", "half"), ("router_scoring", "softmax"), ("router_bias", False), ("norm_topk_prob", False),
           ("n_group", 1), ("topk_group", 1)),
    required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"),
    unsupported=(("topk_method", "greedy"), ("scoring_func", "softmax"), ("hidden_act", "silu")),
    names=per_expert("mlp.experts"), extra_layers_ignored=True, rope_types=("default", "yarn"),
)
