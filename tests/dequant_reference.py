"""The fp model a quantized checkpoint stands for: the source with every quantized weight replaced by its
dequantization (fp32). Its logits are what the quantized model's must equal."""

import torch

import quantkit
from quantkit.nn.quantized import QuantExperts, QuantLinear

PROJS = ("gate_proj", "up_proj", "down_proj")


def expert_weights(experts: QuantExperts, proj: str) -> torch.Tensor:
    """fp32 [E, N, K] of one projection of a quantized experts module, whatever its storage."""
    return torch.stack([experts.expert_weight(e, proj, torch.float32) for e in range(experts.num_experts)])


def dequantized_reference(qmodel, src):
    ref = quantkit.load(src)
    qmods = dict(qmodel.named_modules())
    with torch.no_grad():
        for name, mod in ref.named_modules():
            q = qmods.get(name)
            if isinstance(q, QuantLinear):
                mod.weight.copy_(q.weight(torch.float32))
            elif isinstance(q, QuantExperts):
                for proj in PROJS:
                    getattr(mod, proj).copy_(expert_weights(q, proj))
    return ref
