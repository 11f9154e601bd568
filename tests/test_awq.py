"""AWQ: folding leaves the fp model unchanged; the search never scores worse than plain quantization."""

import copy

import pytest
import torch

import quantkit
from quantkit.calib.capture import capture_layer
from quantkit.pipeline.awq_apply import apply_awq
from quantkit.quant.awq import search_scale
from quantkit.quant.config import Recipe, make_plan
from quantkit.quant.rtn import rtn


@pytest.mark.parametrize("src,awq_block", [(s, False) for s in (
    "random:ernie-tiny", "random:qwen2-moe-tiny", "random:glm4-moe-tiny", "random:olmoe-tiny", "random:mixtral-tiny")]
    + [("random:ernie-tiny", True), ("random:qwen2-moe-tiny", True)])  # q/k/v bias, the shared-expert gate, q/k norms,
def test_folding_leaves_fp_logits_unchanged(src, awq_block):  # renamed experts; block scoring with and without a shared gate
    model = quantkit.load(src)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids)
    recipe = Recipe.from_dict({"name": "awq", "rules": [{"pattern": ".*", "bits": 4, "group_size": 128, "method": "awq",
                                                          "awq_block": awq_block}]})
    plan = make_plan(model.config, recipe)
    h = model.model.embed_tokens(ids)
    cos, sin = model.rope(0, 24, "cpu")
    for idx, layer in enumerate(model.model.layers):
        old = copy.deepcopy(layer.state_dict())
        cap = capture_layer(layer, [h], cos, sin, expert_calibration="all")
        prefix = f"model.layers.{idx}."
        entries = {e.module[len(prefix):]: e for e in plan.entries if e.module.startswith(prefix)}
        chosen = apply_awq(layer, cap, entries, alphas=(0.5,), sample=(h, cos, sin))  # force a real scaling
        # (the block scoring edits the weights in place while it scores: the unchanged logits check the restore)
        assert chosen and set(chosen.values()) <= {0.5, "duo:0.50", -1.0}
        changed = [k for k, v in layer.state_dict().items() if not torch.equal(v, old[k])]
        assert any("layernorm" in k for k in changed) and any("v_proj" in k for k in changed)
        with torch.no_grad():
            h = layer(h, cos, sin)
    with torch.no_grad():
        after = model(ids)
    assert (after - before).abs().max().item() <= 1e-4 * before.abs().max().item()


def test_search_never_worse_than_unscaled_and_helps_with_salient_channels():
    g = torch.Generator().manual_seed(0)
    mag = torch.ones(128)
    mag[torch.randperm(128, generator=g)[:4]] = 20.0  # a few salient input channels, as AWQ observed in LLMs
    x = torch.randn(2048, 128, generator=g) * mag
    w = torch.randn(64, 128, generator=g)
    quant = lambda t: rtn(t, 4, 128, False).dequantize()
    s, alpha, errors = search_scale([(w, x.T @ x)], x.abs().mean(0), quant)
    assert min(errors) <= errors[0]  # α = 0 is plain RTN and always a candidate
    assert alpha > 0 and min(errors) < 0.5 * errors[0]  # measured: 0.37x at 4-bit g128
    torch.testing.assert_close(s, x.abs().mean(0).pow(alpha) / (x.abs().mean(0).pow(alpha).max() * x.abs().mean(0).pow(alpha).min()).sqrt())


def test_weight_aware_candidates_never_worse_and_weight_mean_is_per_input_column():
    from quantkit.quant.awq import weight_mean

    w = torch.tensor([[1.0, 2.0, 4.0, 4.0], [4.0, 2.0, 1.0, 2.0]])
    torch.testing.assert_close(weight_mean([w], 2), torch.tensor([0.75, 0.75, 0.75, 1.0]), atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1024, 128, generator=g) * torch.rand(128, generator=g) * 4
    w = torch.randn(64, 128, generator=g) * torch.rand(128, generator=g)
    quant = lambda t: rtn(t, 4, 64, True).dequantize()
    _, _, plain = search_scale([(w, x.T @ x)], x.abs().mean(0), quant)
    s, label, both = search_scale([(w, x.T @ x)], x.abs().mean(0), quant, w_mean=weight_mean([w], 64))
    assert both[:len(plain)] == plain and min(both) <= min(plain)
    assert torch.isfinite(s).all()


def test_block_rescoring_decides_among_the_hessian_shortlist_and_plain():
    """``rescore`` picks among the Hessian's best ``top`` candidates and s = 1: here it prefers s = 1, which the
    Hessian error ranks last, so α = 0 must win; an α outside the shortlist is never scored."""
    g = torch.Generator().manual_seed(0)
    mag = torch.ones(128)
    mag[:4] = 20.0
    x = torch.randn(2048, 128, generator=g) * mag
    w = torch.randn(64, 128, generator=g)
    quant = lambda t: rtn(t, 4, 128, False).dequantize()
    seen = []

    def rescore(s):
        seen.append(s)
        return float((s - 1).abs().max())  # 0 only for s = 1
    _, alpha_h, errors = search_scale([(w, x.T @ x)], x.abs().mean(0), quant)
    s, alpha, errors_b = search_scale([(w, x.T @ x)], x.abs().mean(0), quant, rescore=rescore, top=3)
    assert alpha_h != 0 and alpha == 0 and torch.allclose(s, torch.ones(128))
    assert errors_b == errors and len(seen) == 4  # 3 best by the Hessian error + α = 0
