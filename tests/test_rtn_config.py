"""RTN on the grouped grid, and the recipe/plan rules (fused groups, fallbacks, recipe files)."""

import json

import pytest
import torch

from quantkit.errors import UsageError
from quantkit.model.config import ErnieMoeConfig
from quantkit.quant.config import BUILTIN_RECIPES, Recipe, Rule, effective_group, get_recipe, make_plan
from quantkit.quant.rtn import qrange, rtn
from quantkit.sources.random_models import ERNIE_TINY, hf_config


@pytest.mark.parametrize("bits,sym", [(2, False), (3, False), (4, True), (4, False), (8, True)])
def test_rtn_error_is_at_most_half_a_step(bits, sym):
    w = torch.randn(3, 24, 128, generator=torch.Generator().manual_seed(bits))
    qt = rtn(w, bits, 32, sym, scale_dtype=torch.float32)
    lo, hi = qrange(bits)
    assert qt.codes.min() >= lo and qt.codes.max() <= hi and (qt.zeros is None) == sym
    err = (qt.dequantize() - w).abs().reshape(3, 24, 4, 32)
    step = qt.scales[..., None]
    # within half a step everywhere (sym: +absmax sits at 7.5 steps and clamps to 7, still half a step)
    assert bool((err <= step * 0.5 + 1e-6).all())
    # 3-D experts quantize exactly like each expert on its own
    per = rtn(w[1], bits, 32, sym, scale_dtype=torch.float32)
    assert torch.equal(per.codes, qt.codes[1]) and torch.equal(per.scales, qt.scales[1])


def test_clip_search_never_increases_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 12.0  # an outlier: clipping pays off
    for bits, sym in ((2, False), (4, True)):
        plain = (rtn(w, bits, 64, sym).dequantize() - w).pow(2).reshape(64, 4, 64).sum(-1)
        clipped = (rtn(w, bits, 64, sym, clip_search=True).dequantize() - w).pow(2).reshape(64, 4, 64).sum(-1)
        assert bool((clipped <= plain + 1e-6).all()) and clipped.sum() < plain.sum()


def test_group_fallback_is_documented():
    assert effective_group(128, 576) == (64, "group 128 does not divide K=576: using 64")
    assert effective_group(128, 1536) == (128, "")
    assert effective_group(None, 576) == (576, "")
    with pytest.raises(UsageError, match="no power-of-two"):
        effective_group(32, 100)


def tiny_cfg():
    return ErnieMoeConfig.from_dict(hf_config(ERNIE_TINY, "float32"))


def test_plan_covers_every_weight_and_never_the_router():
    plan = make_plan(tiny_cfg(), BUILTIN_RECIPES["w4g128"])
    names = {e.module for e in plan.entries}
    assert "model.layers.1.mlp.experts.gate_proj" in names and "model.layers.1.mlp.shared_experts.down_proj" in names
    assert not any(".mlp.gate" == n[-9:] or "embed" in n or "norm" in n for n in names)
    assert all(e.group_size == 64 and "K=64" in e.note for e in plan.entries if e.shape[-1] == 64 and not e.is_experts)


def test_a_layers_routed_experts_share_one_fallback_group():
    """vLLM loads a layer's experts as one MoE with one scheme: the fallback picks a group that divides both
    gate/up's K (hidden 64) and down's K (moe_intermediate 32), not 64 for one and 32 for the other."""
    plan = make_plan(tiny_cfg(), BUILTIN_RECIPES["w4g128"])
    experts = [e for e in plan.entries if e.is_experts]
    assert experts and {e.group_size for e in experts} == {32}
    assert all("one group for the layer's routed experts" in e.note for e in experts)
    # a recipe that gives down_proj its own rule keeps its own group (vLLM then refuses: one scheme per MoE)
    r = Recipe("down8", rules=((r"experts\.down_proj", Rule(bits=8, group_size=None)), (".*", Rule(bits=4))))
    plan = make_plan(tiny_cfg(), r)
    assert plan.entry("model.layers.1.mlp.experts.gate_proj").group_size == 64
    # per channel stays per channel: one scale per row, K of each projection
    plan = make_plan(tiny_cfg(), BUILTIN_RECIPES["w8"])
    assert [plan.entry(f"model.layers.1.mlp.experts.{p}").group_size for p in ("gate_proj", "down_proj")] == [64, 32]


def test_fused_groups_must_share_a_rule():
    r = Recipe("split", rules=((r"q_proj", Rule(bits=8, group_size=None)), (".*", Rule(bits=4))))
    with pytest.raises(UsageError, match="q_proj.*k_proj.*v_proj.*share one rule"):
        make_plan(tiny_cfg(), r)
    r = Recipe("gate-only", rules=((".*",  Rule(bits=4)),), ignore=(r"experts\.up_proj",))
    with pytest.raises(UsageError, match="gate_proj.*up_proj"):
        make_plan(tiny_cfg(), r)
    ok = Recipe("experts-2bit", rules=((r"mlp\.experts\.", Rule(bits=2, group_size=32, symmetric=False)), (".*", Rule())),
                ignore=(r"shared_experts",))
    plan = make_plan(tiny_cfg(), ok)
    assert plan.entry("model.layers.1.mlp.experts.up_proj").rule.bits == 2
    assert "model.layers.1.mlp.shared_experts.up_proj" in plan.unquantized


def test_recipe_files_roundtrip(tmp_path):
    r = BUILTIN_RECIPES["w2g64"]
    (tmp_path / "r.json").write_text(json.dumps(r.to_dict()))
    assert get_recipe(str(tmp_path / "r.json")) == r
    (tmp_path / "r.yaml").write_text("name: mine\nrules:\n  - pattern: experts\n    bits: 2\n    group_size: 64\n    symmetric: false\n  - pattern: '.*'\n    bits: 4\n")
    mine = get_recipe(str(tmp_path / "r.yaml"))
    assert mine.rule_for("model.layers.1.mlp.experts.up_proj").bits == 2 and mine.rule_for("x.q_proj").bits == 4
    for bad, msg in [({"rules": [{"pattern": "(", "bits": 4}]}, "bad regex"), ({"rules": [{"pattern": ".*", "bits": 5}]}, "bits"),
                     ({"rules": [{"pattern": ".*", "bitz": 4}]}, "unknown key"), ({"rules": "x"}, "'rules' list")]:
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(UsageError, match=msg):
            get_recipe(str(tmp_path / "bad.json"))
    with pytest.raises(UsageError, match="unknown recipe"):
        get_recipe("w5")


def test_weighted_clip_search_never_worse_in_its_metric_and_follows_the_weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=g)
    w[:, 0] = 8.0  # column 0 is every group's outlier
    for cw, where in ((torch.ones(128), "flat"), (torch.full((128,), 1e-3), "outlier matters")):
        if where == "outlier matters":
            cw[0] = 1e3
        metric = lambda q: ((q.dequantize() - w).pow(2) * cw).reshape(32, 2, 64).sum(-1)
        plain, clipped = rtn(w, 4, 64, True), rtn(w, 4, 64, True, clip_search=True, clip_weight=cw[None])
        assert bool((metric(clipped) <= metric(plain) + 1e-5).all())
    # where column 0 dominates the metric, the first group keeps its full range (no clipping of the outlier)
    assert torch.equal(clipped.scales[:, 0], plain.scales[:, 0])


def test_gptq_dampening_is_a_rule_setting_that_reaches_gptq(monkeypatch):
    from quantkit.pipeline import layer_quant
    from quantkit.quant.config import PlanEntry

    r = Rule(method="gptq", damp=0.3)
    assert Rule.from_dict(r.to_dict()) == r and r.to_dict()["damp"] == 0.3
    assert "damp" not in Rule(method="awq").to_dict()  # a GPTQ setting: other rules read as before it
    for bad in (0, -1, "0.1", True, float("nan"), 1000):
        with pytest.raises(UsageError, match="damp"):
            Rule(method="gptq", damp=bad)
    seen = []
    real = layer_quant.gptq
    monkeypatch.setattr(layer_quant, "gptq", lambda *a, **k: seen.append(k["damp"]) or real(*a, **k))
    w = torch.randn(16, 64)
    X = torch.randn(256, 64)
    layer_quant._quantize(PlanEntry("x.q_proj", (16, 64), r, 64), w, X.T @ X, torch.float32, True)
    assert seen == [0.3]
