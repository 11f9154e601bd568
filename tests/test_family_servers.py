"""vLLM's per-family loader rules on what they refuse: each rule broken on purpose in a real quantkit output (the
outputs they accept, and transformers reading them, are in test_family_quantize.py)."""

import pytest

from quantkit.pipeline.quantize import QuantizeOptions, quantize
from quantkit.quant.config import BUILTIN_RECIPES


def _view_with(out, edit):
    import copy

    from quantkit.serving import CheckpointView

    v = CheckpointView.from_dir(out)
    config = copy.deepcopy(v.config)
    edit(config["quantization_config"], config)
    return CheckpointView(config, v.tensors)


@pytest.fixture(scope="module")
def rtn(tmp_path_factory):
    root = tmp_path_factory.mktemp("rtn")
    for fam in ("mixtral-tiny", "olmoe-tiny", "qwen3-moe-tiny"):
        quantize(f"random:{fam}", root / fam, BUILTIN_RECIPES["w4g128"], QuantizeOptions(progress=False))
    return root


def _drop_class_targets(q, _):
    for g in q["config_groups"].values():
        g["targets"] = [t for t in g["targets"] if t != "Linear"]


def test_mixtral_experts_need_a_target_under_vllms_gate_proj_names(rtn):
    """vLLM looks a FusedMoE's scheme up as experts.0.gate_proj even where the Hub says w1: regexes on w1 alone miss."""
    from quantkit.serving import vllm

    assert vllm.check(_view_with(rtn / "mixtral-tiny", lambda q, c: None)) == []
    reasons = vllm.check(_view_with(rtn / "mixtral-tiny", _drop_class_targets))
    assert reasons and all(r.what == "no matching target" and ".block_sparse_moe.experts.0.w1" in r.where for r in reasons)


def test_olmoe_attention_is_reached_by_the_class_target_only(rtn):
    from quantkit.serving import vllm

    reasons = vllm.check(_view_with(rtn / "olmoe-tiny", _drop_class_targets))
    assert {r.where.rsplit(".", 1)[-1] for r in reasons} == {"q_proj", "o_proj"}
    assert all(r.what == "no matching target" for r in reasons)


def test_qwen3_router_must_be_ignored_and_tp_cannot_exceed_experts(rtn):
    from quantkit.serving import vllm

    def unignore(q, _):
        q["ignore"] = [p for p in q["ignore"] if "mlp" not in p]

    reasons = vllm.check(_view_with(rtn / "qwen3-moe-tiny", unignore))
    assert reasons and {r.what for r in reasons} == {"router not ignored"}
    reasons = vllm.check(_view_with(rtn / "qwen3-moe-tiny", lambda q, c: None), tp=16)
    assert any(r.what == "tensor parallelism" and r.where == "num_experts" for r in reasons)


@pytest.mark.parametrize("source", ["qwen3-moe-tiny", "mixtral-tiny"])
def test_transformers_rules_refuse_what_transformers_refuses(tmp_path, source):
    """Asymmetric int4 in a new family: transformers' own loader fails, and ``check --server transformers`` says so
    (Mixtral's w1/w3/w2 experts are recognised as routed experts)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from quantkit.quant.config import Recipe, Rule
    from quantkit.serving import CheckpointView, check

    out = tmp_path / "q"
    quantize(f"random:{source}", out, Recipe(name="w4g32-asym", rules=((".*", Rule(bits=4, group_size=32,
                                                                                   symmetric=False)),)),
             QuantizeOptions(progress=False))
    assert check(CheckpointView.from_dir(out), "transformers")
    hf_logging.set_verbosity_error()
    with pytest.raises((RuntimeError, ValueError, AssertionError)):
        AutoModelForCausalLM.from_pretrained(out, dtype="float32")
