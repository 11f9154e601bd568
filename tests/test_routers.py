"""Routing variants (``quantkit.model.routers``) against transformers' own routers (ERNIE's included)."""

import pytest
import torch

from quantkit.errors import UsageError
from quantkit.model.layers import route as ernie_route
from quantkit.model.routers import RouterSpec, route

T, H = 37, 24


def _x(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, H, generator=g), g


def _same(ids, w, ref_ids, ref_w):
    """Same expert set per token with the same weights (order within a token may differ: sorted=False)."""
    a, ia = ids.sort(-1)
    b, ib = ref_ids.sort(-1)
    assert torch.equal(a, b)
    assert torch.allclose(w.gather(-1, ia), ref_w.float().gather(-1, ib), atol=1e-6, rtol=0)


def test_ernie_spec_matches_transformers():
    """ERNIE's RouterSpec (softmax, correction bias for the choice only, clamp renorm) against transformers'
    ``Ernie4_5_MoeTopKRouter``; ``layers.route`` (the kernels' twin) is that spec."""
    from transformers import Ernie4_5_MoeConfig
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

    ref = Ernie4_5_MoeTopKRouter(Ernie4_5_MoeConfig(hidden_size=H, moe_num_experts=8, moe_k=3, moe_norm_min=1e-12))
    x, g = _x()
    with torch.no_grad():
        ref.weight.copy_(torch.randn(8, H, generator=g))
        ref.moe_statics.e_score_correction_bias.copy_(0.05 * torch.randn(ref.moe_statics.e_score_correction_bias.shape,
                                                                           generator=g))
        _, ref_w, ref_ids = ref(x)
    bias = ref.moe_statics.e_score_correction_bias
    ids, w = route(x, ref.weight, bias, RouterSpec(top_k=3, num_experts=8, has_bias=True, norm_min=1e-12))
    _same(ids, w, ref_ids, ref_w)
    assert [t.tolist() for t in ernie_route(x, ref.weight, bias, 3, 1e-12)] == [ids.tolist(), w.tolist()]


@pytest.mark.parametrize("family,norm", [("mixtral", True), ("qwen3_moe", True), ("qwen3_moe", False),
                                         ("qwen2_moe", False), ("olmoe", False)])
def test_softmax_routers_match_transformers(family, norm):
    import transformers

    names = {"mixtral": ("MixtralConfig", "MixtralTopKRouter"), "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeTopKRouter"),
             "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeTopKRouter"), "olmoe": ("OlmoeConfig", "OlmoeTopKRouter")}
    cfg_cls, router_cls = names[family]
    mod = __import__(f"transformers.models.{family}.modeling_{family}", fromlist=[router_cls])
    kw = dict(hidden_size=H, num_experts_per_tok=2)
    kw.update({"num_local_experts": 6} if family == "mixtral" else {"num_experts": 6, "norm_topk_prob": norm})
    ref = getattr(mod, router_cls)(getattr(transformers, cfg_cls)(**kw))
    x, g = _x(1)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(6, H, generator=g))
        _, ref_w, ref_ids = ref(x)
    ids, w = route(x, ref.weight, None, RouterSpec(top_k=2, num_experts=6, renormalize=norm))
    _same(ids, w, ref_ids, ref_w)


@pytest.mark.parametrize("n_group,topk_group,norm,scale", [(4, 2, True, 2.5), (1, 1, True, 1.0), (8, 3, False, 1.8)])
def test_sigmoid_group_router_matches_deepseek_v3(n_group, topk_group, norm, scale):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    E, k = 16, 4
    cfg = DeepseekV3Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=k, n_group=n_group,
                           topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=scale)
    ref = DeepseekV3TopkRouter(cfg)
    x, g = _x(2)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(E, H, generator=g))
        ref.e_score_correction_bias.copy_(0.3 * torch.randn(E, generator=g))
        _, ref_w, ref_ids = ref(x)
    spec = RouterSpec(top_k=k, num_experts=E, scoring="sigmoid", renormalize=norm, has_bias=True, n_group=n_group,
                      topk_group=topk_group, routed_scaling_factor=scale)
    ids, w = route(x, ref.weight, ref.e_score_correction_bias, spec)
    _same(ids, w, ref_ids, ref_w)


@pytest.mark.parametrize("kw,msg", [(dict(top_k=0), "top_k"), (dict(n_group=3), "n_group"),
                                    (dict(n_group=4, topk_group=5), "topk_group"), (dict(scoring="relu"), "scoring")])
def test_bad_router_specs_are_one_clear_error(kw, msg):
    with pytest.raises(UsageError, match=msg):
        RouterSpec(**{"top_k": 2, "num_experts": 8, **kw})
