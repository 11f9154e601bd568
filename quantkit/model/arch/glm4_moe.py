"""GLM-4.5 (``Glm4MoeForCausalLM``): rotate-half RoPE on the first ``partial_rotary_factor`` of each head, q/k/v bias
(``attention_bias``), optional per-head q/k RMSNorm (``use_qk_norm``), dense layers before ``first_k_dense_replace``,
sigmoid group-limited router with a correction bias (Hub ``mlp.gate.e_score_correction_bias``, ``[E]``) and a
routed scaling factor, plain shared experts of width ``moe_intermediate_size * n_shared_experts``. Checkpoints carry
an MTP layer at index ``num_hidden_layers``, which nobody reads here."""

from quantkit.model.arch.spec import ArchSpec, per_expert

SPEC = ArchSpec(
    name="glm4_moe", architectures=("Glm4MoeForCausalLM",), model_type="glm4_moe",
    config_keys=(("moe_num_experts", "n_routed_experts"), ("moe_k", "num_experts_per_tok"),
                 ("moe_num_shared_experts", "n_shared_experts"), ("moe_layer_start_index", "first_k_dense_replace"),
                 ("qkv_bias", "attention_bias"), ("qk_norm", "use_qk_norm")),
    defaults=(("rope_theta", 10000.0), ("tie_word_embeddings", False), ("partial_rotary_factor", 0.5),
              ("moe_num_shared_experts", 1), ("moe_layer_start_index", 1), ("norm_topk_prob", True)),
    fixed=(("rope_style", "half"), ("router_scoring", "sigmoid"), ("router_bias", True), ("moe_norm_min", 0.0),
           ("o_bias", False)),
    required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
    names=per_expert("mlp.experts") + (("mlp.moe_statics.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),),
    router_bias_rank=1, extra_layers_ignored=True,
)
