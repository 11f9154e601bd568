"""Qwen2-MoE (``Qwen2MoeForCausalLM``): rotate-half RoPE, q/k/v bias (``qkv_bias``, on by default), softmax top-k
router, one shared expert of its own width gated by ``sigmoid(mlp.shared_expert_gate(x))`` (a ``[1, H]`` linear,
never quantized); on the Hub the shared expert is ``mlp.shared_expert`` (singular)."""

from quantkit.model.arch.spec import ArchSpec, per_expert

SPEC = ArchSpec(
    name="qwen2_moe", architectures=("Qwen2MoeForCausalLM",), model_type="qwen2_moe",
    config_keys=(("moe_num_experts", "num_experts"), ("moe_k", "num_experts_per_tok"),
                 ("moe_layer_interval", "decoder_sparse_step"), ("dense_layers", "mlp_only_layers")),
    defaults=(("rms_norm_eps", 1e-6), ("rope_theta", 10000.0), ("tie_word_embeddings", False),
              ("norm_topk_prob", False), ("qkv_bias", True), ("max_position_embeddings", 32768)),
    fixed=(("rope_style", "half"), ("moe_layer_start_index", 0),
           ("router_bias", False), ("moe_norm_min", 0.0), ("shared_expert_gate", True)),
    required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size"),
    unsupported=(("use_sliding_window", False),),
    names=per_expert("mlp.experts") + (("mlp.shared_experts", "mlp.shared_expert"),),
    never_quantized=("mlp.shared_expert_gate",),
)
