"""Qwen3-MoE (``Qwen3MoeForCausalLM``): rotate-half RoPE, per-head q/k RMSNorm, softmax top-k router
(renormalised by ``norm_topk_prob``), no shared expert, dense layers by ``mlp_only_layers`` / ``decoder_sparse_step``."""

from quantkit.model.arch.spec import ArchSpec, per_expert

SPEC = ArchSpec(
    name="qwen3_moe", architectures=("Qwen3MoeForCausalLM",), model_type="qwen3_moe",
    config_keys=(("moe_num_experts", "num_experts|num_local_experts"), ("moe_k", "num_experts_per_tok"),
                 ("moe_layer_interval", "decoder_sparse_step"), ("dense_layers", "mlp_only_layers"),
                 ("qkv_bias", "attention_bias"), ("o_bias", "attention_bias")),
    defaults=(("rms_norm_eps", 1e-6), ("rope_theta", 10000.0), ("tie_word_embeddings", False),
              ("norm_topk_prob", False), ("max_position_embeddings", 32768)),
    fixed=(("rope_style", "half"), ("qk_norm", "head"), ("moe_layer_start_index", 0),
           ("router_bias", False), ("moe_norm_min", 0.0)),
    required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_experts|num_local_experts", "num_experts_per_tok", "moe_intermediate_size"),
    unsupported=(("use_sliding_window", False),),
    names=per_expert("mlp.experts"),
)
