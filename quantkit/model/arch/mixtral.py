"""Mixtral (``MixtralForCausalLM``): rotate-half RoPE, every layer MoE, softmax top-k always renormalised, no shared
expert; experts are ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down), each of width
``intermediate_size``, and the router ``block_sparse_moe.gate``."""

from quantkit.model.arch.spec import ArchSpec, per_expert

SPEC = ArchSpec(
    name="mixtral", architectures=("MixtralForCausalLM",), model_type="mixtral",
    config_keys=(("moe_num_experts", "num_local_experts"), ("moe_k", "num_experts_per_tok"),
                 ("moe_intermediate_size", "intermediate_size")),
    defaults=(("rope_theta", 1e6), ("tie_word_embeddings", False), ("max_position_embeddings", 4096 * 32)),
    fixed=(("rope_style", "half"), ("moe_layer_start_index", 0),
           ("router_bias", False), ("moe_norm_min", 0.0), ("norm_topk_prob", True)),
    required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_local_experts", "num_experts_per_tok"),
    unsupported=(("sliding_window", None),),
    ct_class_target=r"mlp\.experts\.",
    names=per_expert("block_sparse_moe.experts", gate="w1", up="w3", down="w2")
    + (("mlp.gate", "block_sparse_moe.gate"),),
)
