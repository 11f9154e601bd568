"""ERNIE-4.5-MoE (``Ernie4_5_MoeForCausalLM``): interleaved RoPE, softmax router with a correction bias chosen
by top-k of probs + bias and renormalised by ``max(sum, moe_norm_min)``, shared experts, dense layers by
start/end/interval. Its Hub names are quantkit's canonical names (plus the FastDeploy-style fused
``up_gate_proj`` earlier exports wrote, still read)."""

from quantkit.model.arch.spec import ArchSpec, per_expert

SPEC = ArchSpec(
    name="ernie", architectures=("Ernie4_5_MoeForCausalLM",), model_type="ernie4_5_moe",
    config_keys=(("qkv_bias", "use_bias"), ("o_bias", "use_bias"), ("mlp_bias", "use_bias")),
    required=("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    names=per_expert("mlp.experts") + (("mlp.experts.up_gate_proj", "mlp.experts.{e}.up_gate_proj"),),
    router_bias_rank=2,
)
