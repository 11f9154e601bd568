"""MoE routing variants as data (``RouterSpec``) and their fp32 torch reference (``route``).

Every family's router is one ``RouterSpec``; the Triton kernel (``quantkit.kernels.routing``) is this
function's twin. All math is fp32, as in the reference implementations:

- ERNIE-4.5: softmax probs; experts chosen by top-k of probs + correction bias; weighted by the unbiased
  probs renormalised by ``max(sum, norm_min)``  (transformers ``Ernie4_5_MoeTopKRouter``).
- Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax, top-k, renormalised by the plain sum when
  ``renormalize`` (Mixtral always; the Qwens and OLMoE by ``norm_topk_prob``).
- DeepSeek-V3, GLM-4.5: sigmoid scores; choice by scores + correction bias, restricted to the
  ``topk_group`` best of ``n_group`` expert groups (a group scores the sum of its two best biased scores;
  experts outside the chosen groups are never chosen, as transformers 5.24's ``masked_fill(-inf)``); weighted by the unbiased scores, renormalised by
  ``sum + 1e-20`` when ``renormalize``, times ``routed_scaling_factor``
  (transformers ``DeepseekV3TopkRouter.forward``, ``Glm4MoeTopkRouter``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantkit.errors import UsageError

SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RouterSpec:
    top_k: int
    num_experts: int
    scoring: str = "softmax"          # 'softmax' | 'sigmoid'
    renormalize: bool = True          # divide the chosen weights by their sum
    norm_min: float = 0.0             # > 0: ERNIE's clamp of that sum from below; 0: sum (+ 1e-20 for sigmoid)
    has_bias: bool = False            # a correction bias [E] added to the scores for the choice only
    n_group: int = 1                  # group-limited choice (DeepSeek-V3): experts split into n_group groups
    topk_group: int = 1               # ... of which the best topk_group are eligible
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        if self.scoring not in SCORINGS:
            raise UsageError(f"router: scoring {self.scoring!r} is not one of {', '.join(SCORINGS)}")
        if not 0 < self.top_k <= self.num_experts:
            raise UsageError(f"router: top_k={self.top_k} must be in 1..num_experts={self.num_experts}")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise UsageError(f"router: n_group={self.n_group} must divide num_experts={self.num_experts}")
        if self.n_group > 1 and not 0 < self.topk_group <= self.n_group:
            raise UsageError(f"router: topk_group={self.topk_group} must be in 1..n_group={self.n_group}")
        if self.n_group > 1 and self.num_experts // self.n_group < 2:
            raise UsageError("router: group-limited routing needs at least 2 experts per group")


def scores(x: torch.Tensor, gate_weight: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """x [T, H], gate_weight [E, H] -> the unbiased routing scores [T, E] in fp32 (softmax probs or sigmoids)."""
    logits = F.linear(x.float(), gate_weight.float())  # [T, E]
    return logits.softmax(-1) if spec.scoring == "softmax" else logits.sigmoid()


def route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, spec: RouterSpec
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], gate_weight [E, H], bias [E] or [1, E] (when ``spec.has_bias``)
    -> (topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
    probs = scores(x, gate_weight, spec)
    choice = probs + bias.float().reshape(-1) if spec.has_bias else probs
    if spec.n_group > 1:
        T = choice.shape[0]
        grouped = choice.view(T, spec.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, n_group]
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(spec.topk_group, dim=-1).indices, 1.0)
        choice = grouped.masked_fill(keep[..., None] == 0, float("-inf")).view(T, -1)
    ids = choice.topk(spec.top_k, dim=-1).indices
    weights = probs.gather(-1, ids)
    if spec.renormalize:
        total = weights.sum(-1, keepdim=True)
        if spec.norm_min > 0:
            total = total.clamp(min=spec.norm_min)
        elif spec.scoring == "sigmoid":
            total = total + 1e-20
        weights = weights / total
    if spec.routed_scaling_factor != 1.0:
        weights = weights * spec.routed_scaling_factor
    return ids, weights
