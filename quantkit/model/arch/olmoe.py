"""OLMoE (``OlmoeForCausalLM``): rotate-half RoPE, RMSNorm over the whole q and k projections (before the head
split), every layer MoE with experts of width ``intermediate_size``, softmax top-k router (``norm_topk_prob``)."""

from quantkit.model.arch.spec import ArchSpec, per_expert

SPEC = ArchSpec(
    name="olmoe", architectures=("OlmoeForCausalLM",), model_type="olmoe",
    config_keys=(("moe_num_experts", "num_experts"), ("moe_k", "num_experts_per_tok"),
                 ("moe_intermediate_size", "intermediate_size"),
                 ("qkv_bias", "attention_bias"), ("o_bias", "attention_bias")),
    defaults=(("rope_theta", 10000.0), ("tie_word_embeddings", False), ("norm_topk_prob", False),
              ("max_position_embeddings", 4096)),
    fixed=(("rope_style", "half"), ("qk_norm", "proj"), ("moe_layer_start_index", 0),
           ("router_bias", False), ("moe_norm_min", 0.0)),
    required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_experts", "num_experts_per_tok"),
    unsupported=(("clip_qkv", None),),
    ct_class_target=r"self_attn\.",
    names=per_expert("mlp.experts"),
)
