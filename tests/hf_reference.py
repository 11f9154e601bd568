"""Build and save transformers' Ernie4_5_MoeForCausalLM (the independent reference) from tiny configs."""

import torch


def make_hf_model(seed: int = 0, **overrides):
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    kw = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, moe_intermediate_size=16, moe_k=2, moe_num_experts=4,
              moe_num_shared_experts=1, moe_layer_start_index=1, eos_token_id=None)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(**kw)).eval()
    return randomize(model)


def randomize(model, with_buffers: bool = False):
    """Weights large enough that routing and attention actually matter (norms 1 +- 0.1, correction biases +- 0.05, the
    rest +- 0.2), drawn from torch's global generator in parameter (then buffer) order; RoPE tables are left alone."""
    tensors = list(model.named_parameters()) + (list(model.named_buffers()) if with_buffers else [])
    with torch.no_grad():
        for name, p in tensors:
            if "inv_freq" in name:
                continue
            if "e_score_correction_bias" in name:
                p.copy_(0.05 * torch.randn_like(p))
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model
