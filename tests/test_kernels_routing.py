"""The routing kernel (Triton) against its torch twins: ERNIE's routing (``layers.route``) for decode and prefill
token counts, split over H or not, router widths that are and are not powers of two, several top-k, bf16 / fp16 /
fp32 activations and a correction bias that changes the choice; and every ``RouterSpec`` variant against
``routers.route`` (itself tested against transformers' routers): softmax / sigmoid, bias or none, renormalised
(plain sum or ERNIE's clamp) or not, group-limited top-k, a routed scaling factor, zero tokens."""

import pytest
import torch
from kernel_cases import DEV, poison  # noqa: F401

from quantkit.errors import UsageError
from quantkit.kernels import dispatch
from quantkit.kernels.routing import route as triton_route
from quantkit.model import routers
from quantkit.model.layers import route

# (T, E, top_k, H, dtype)
CASES = [(1, 64, 6, 2560, torch.bfloat16), (2, 8, 2, 96, torch.float32), (3, 5, 5, 64, torch.float16),
         (16, 64, 6, 200, torch.bfloat16), (33, 128, 8, 128, torch.bfloat16), (40, 1, 1, 48, torch.float32)]


def ernie(e: int, k: int) -> routers.RouterSpec:
    return routers.RouterSpec(top_k=k, num_experts=e, has_bias=True, norm_min=1e-12)


@pytest.mark.parametrize("t, e, k, hdim, dtype", CASES)
def test_routing_kernel_matches_torch(t, e, k, hdim, dtype):
    gen = torch.Generator().manual_seed(t * 1000 + e)
    x = torch.randn(t, hdim, generator=gen).to(DEV, dtype)
    w = (torch.randn(e, hdim, generator=gen) * 2 / hdim**0.5).to(DEV)
    bias = (0.05 * torch.randn(1, e, generator=gen)).to(DEV)  # large enough to reorder some choices
    ids, weights = triton_route(x, w, bias, ernie(e, k))
    ref_ids, ref_w = route(x, w, bias, k, 1e-12)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)
    assert all(int(c.abs().sum()) == 0 for c in dispatch._COUNTERS.values())  # split over H: counters reset


def test_bias_changes_the_choice_as_in_torch():
    """A bias that pushes expert 3 to the top: chosen, but weighted by its unbiased probability."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(DEV)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)).to(DEV) / 8
    bias = torch.zeros(1, 8, device=DEV)
    bias[0, 3] = 10.0
    ids, weights = triton_route(x, w, bias, ernie(8, 2))
    ref_ids, ref_w = route(x, w, bias, 2, 1e-12)
    assert bool((ids[:, 0] == 3).all()) and torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


def spec_cases():
    """(name, T, H, RouterSpec): every scoring x bias x normalisation, groups, scaling; E up to 64, k up to 8."""
    out = []
    for scoring in ("softmax", "sigmoid"):
        for has_bias in (False, True):
            for renorm, norm_min in ((False, 0.0), (True, 0.0), (True, 1e-12)):
                name = f"{scoring}{'-bias' if has_bias else ''}-{'clamp' if norm_min else 'sum' if renorm else 'raw'}"
                e, k = (64, 8) if has_bias else (24, 3)
                out.append((name, 5, 96, routers.RouterSpec(top_k=k, num_experts=e, scoring=scoring, renormalize=renorm,
                                                            norm_min=norm_min, has_bias=has_bias)))
    out += [("mixtral", 3, 64, routers.RouterSpec(top_k=2, num_experts=8)),
            ("olmoe", 4, 80, routers.RouterSpec(top_k=8, num_experts=64, renormalize=False)),
            ("qwen-scaled", 2, 64, routers.RouterSpec(top_k=4, num_experts=60, renormalize=False,
                                                      routed_scaling_factor=0.5)),
            ("glm-like", 17, 64, routers.RouterSpec(top_k=8, num_experts=64, scoring="sigmoid", has_bias=True,
                                                    routed_scaling_factor=1.8)),
            ("groups-8x4-of-2", 6, 64, routers.RouterSpec(top_k=4, num_experts=8, scoring="sigmoid", has_bias=True,
                                                          n_group=4, topk_group=2, routed_scaling_factor=2.5)),
            ("groups-softmax-nobias", 5, 48, routers.RouterSpec(top_k=6, num_experts=48, n_group=6, topk_group=3)),
            ("groups-20-per-group", 3, 64, routers.RouterSpec(top_k=6, num_experts=160, scoring="sigmoid",
                                                              has_bias=True, n_group=8, topk_group=3)),
            ("deepseek-v3", 3, 128, routers.RouterSpec(top_k=8, num_experts=256, scoring="sigmoid", has_bias=True,
                                                       n_group=8, topk_group=4, routed_scaling_factor=2.5))]
    return out


@pytest.mark.parametrize("name, t, hdim, spec", spec_cases(), ids=[c[0] for c in spec_cases()])
def test_every_router_spec_matches_routers_route(name, t, hdim, spec):
    gen = torch.Generator().manual_seed(len(name) * 7 + spec.num_experts)
    e = spec.num_experts
    x = torch.randn(t, hdim, generator=gen).to(DEV, torch.bfloat16)
    w = (torch.randn(e, hdim, generator=gen) * 2 / hdim**0.5).to(DEV)
    bias = (0.1 * torch.randn(e, generator=gen)).to(DEV) if spec.has_bias else None  # reorders some choices
    ids, weights = triton_route(x, w, bias, spec)
    ref_ids, ref_w = routers.route(x, w, bias, spec)
    assert ids.shape == (t, spec.top_k) and ids.dtype == torch.int64 and weights.dtype == torch.float32
    order, ref_order = ids.sort(-1), ref_ids.sort(-1)
    assert torch.equal(order.values, ref_order.values)  # the same expert set per token
    got = weights.gather(-1, order.indices)
    want = ref_w.gather(-1, ref_order.indices)
    assert (got - want).abs().max().item() <= 1e-6 * max(1.0, spec.routed_scaling_factor)
    if spec.n_group > 1:  # the chosen experts span at most topk_group groups
        groups = ids.cpu() // (e // spec.n_group)
        assert all(len(set(row.tolist())) <= spec.topk_group for row in groups)


def test_group_limit_excludes_the_best_expert_of_a_weak_group():
    """Expert 0 has the top score but its group's second best is poor: the group loses, expert 0 is never chosen."""
    spec = routers.RouterSpec(top_k=2, num_experts=8, scoring="sigmoid", has_bias=True, n_group=4, topk_group=2)
    bias = torch.tensor([3.0, -3.0, 1.0, 1.0, 0.9, 0.9, 0.0, 0.0], device=DEV)
    x = torch.zeros(2, 16, device=DEV)
    ids, _ = triton_route(x, torch.zeros(8, 16, device=DEV), bias, spec)
    ref_ids, _ = routers.route(x, torch.zeros(8, 16, device=DEV), bias, spec)
    assert not bool((ids == 0).any()) and torch.equal(ids.sort(-1).values, ref_ids.sort(-1).values)


@pytest.mark.parametrize("spec", [ernie(64, 6), spec_cases()[-1][3]])
def test_zero_tokens(spec):
    ids, weights = triton_route(torch.zeros(0, 32, device=DEV), torch.zeros(spec.num_experts, 32, device=DEV),
                                torch.zeros(spec.num_experts, device=DEV), spec)
    assert ids.shape == weights.shape == (0, spec.top_k) and ids.dtype == torch.int64


def test_bad_input_is_one_clear_error():
    with pytest.raises(UsageError, match="top_k"):
        routers.RouterSpec(top_k=5, num_experts=4)
    with pytest.raises(UsageError, match="experts"):
        triton_route(torch.zeros(1, 16, device=DEV), torch.zeros(4, 16, device=DEV), torch.zeros(4, device=DEV),
                     ernie(8, 2))
    with pytest.raises(UsageError, match="correction bias"):
        triton_route(torch.zeros(1, 16, device=DEV), torch.zeros(4, 16, device=DEV), None, ernie(4, 2))
    with pytest.raises(UsageError, match="eligible"):
        spec = routers.RouterSpec(top_k=5, num_experts=8, n_group=4, topk_group=2)
        triton_route(torch.zeros(1, 16, device=DEV), torch.zeros(8, 16, device=DEV), None, spec)
