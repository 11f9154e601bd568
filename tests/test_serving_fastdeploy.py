"""FastDeploy's loader rules (quantkit/serving/fastdeploy.py) on quantkit's outputs and on small hand-made
checkpoints (a config dict and tensor headers), one broken rule at a time. Each reason must cite the upstream
FastDeploy file its rule comes from; the files named here are where the rules were read."""

import copy

import pytest
import torch

from quantkit.format import fastdeploy as fd
from quantkit.model.config import ErnieMoeConfig
from quantkit.pipeline.quantize import QuantizeOptions, quantize
from quantkit.quant.config import CODE2, W4, get_recipe, layer_range_recipe
from quantkit.serving import CheckpointView, check
from quantkit.serving import fastdeploy as rules
from quantkit.sources.random_models import ERNIE_TINY, hf_config, write_random_checkpoint

DIMS = dict(ERNIE_TINY, hidden_size=128, moe_intermediate_size=128, intermediate_size=256, head_dim=32)


def good_view() -> CheckpointView:
    """What FastDeploy's create_weights declares for the export's own config."""
    cfg = ErnieMoeConfig.from_dict(hf_config(DIMS, "float32"))
    config = fd.config_json(cfg.raw, fd.plan(cfg, get_recipe("w2code")))
    return CheckpointView(config, {s.name: (s.dtype, tuple(s.shape)) for s, _ in fd.expected_tensors(config)})


def mutated(edit) -> CheckpointView:
    v = good_view()
    config, tensors = copy.deepcopy(v.config), dict(v.tensors)
    edit(config, tensors)
    return CheckpointView(config, tensors)


def one_reason(view, source_file: str, tp: int = 1):
    reasons = check(view, "fastdeploy", tp)
    assert reasons and all(source_file in r.source or "quantkit's FastDeploy rules" in r.rule for r in reasons[:1]), reasons
    return reasons


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("serving_fd")
    (base / "src").mkdir()
    write_random_checkpoint(base / "src", DIMS, seed=1, dtype="float32", max_shard_bytes=1 << 30)
    runs = {"fastdeploy": ("w2code", "fastdeploy"), "own-w2code": ("w2code", "quantkit"), "ct-w4g128": ("w4g128", "quantkit")}
    for name, (recipe, export) in runs.items():
        quantize(str(base / "src"), base / name, get_recipe(recipe), QuantizeOptions(progress=False, export=export))
    return base


def test_the_export_loads_and_quantkits_other_layouts_do_not(dirs):
    assert check(CheckpointView.from_dir(dirs / "fastdeploy"), "fastdeploy") == []
    for name in ("own-w2code", "ct-w4g128"):  # config.py::read_model_config: torch_dtype -> torch format
        reasons = check(CheckpointView.from_dir(dirs / name), "fastdeploy")
        assert [r.source for r in reasons] == [fd.source("torch_quant")]
        assert "quantization/__init__.py::_get_offline_quant_config_name" in reasons[0].source
    assert check(CheckpointView.from_dir(dirs / "src"), "fastdeploy") == []  # bf16 Hub layout: FastDeploy's v1 loader


def test_the_export_is_for_fastdeploy_only(dirs):
    """vLLM has no reader for a config whose quantization_config lacks quant_method; quantkit's loader names the
    export as FastDeploy's (its check runs the loader's own skeleton builder)."""
    view = CheckpointView.from_dir(dirs / "fastdeploy")
    assert [r.what for r in check(view, "vllm")] == ["quantization method"]
    reasons = check(view, "quantkit")
    assert len(reasons) == 1 and "FastDeploy wint2 export" in reasons[0].rule


def test_an_earlier_style_export_with_fastdeploys_keys_still_fails_on_names(dirs):
    """quantkit's own 2-bit layout with FastDeploy's quantization keys added (what --export fastdeploy wrote
    before): the torch format and the model. names both refuse it."""
    v = CheckpointView.from_dir(dirs / "own-w2code")
    v.config["quantization_config"].update(quantization="wint2", moe_quant_config={"moe_w2_quant_config": {}})
    sources = [r.source for r in check(v, "fastdeploy")]
    assert sources == [fd.source("torch_quant"), fd.source("names")]
    assert "models/ernie4_5_moe.py" in sources[1] and "utils.py::v1_loader_support" in sources[1]


def test_the_hand_made_good_view_loads():
    assert check(good_view(), "fastdeploy") == []


@pytest.mark.parametrize("edit, source_file", [
    (lambda c, t: c.update(torch_dtype="bfloat16"), "fastdeploy/config.py::ModelConfig.read_model_config"),
    (lambda c, t: c.pop("dtype"), "fastdeploy/config.py::ModelConfig.read_model_config"),
    (lambda c, t: c["quantization_config"].pop("quantization"), "quantization/__init__.py::parse_quant_config"),
    (lambda c, t: c["quantization_config"].update(is_quantized=False), "layers/linear.py::LinearBase.__init__"),
    (lambda c, t: c.update(architectures=["Ernie4_5_ForCausalLM"]), "models/ernie4_5_moe.py"),
    (lambda c, t: c.update(moe_layer_interval=2), "ernie4_5_moe.py::Ernie4_5_DecoderLayer.__init__"),
])
def test_config_rules(edit, source_file):
    one_reason(mutated(edit), source_file)


@pytest.mark.parametrize("key", ["quantization", "dense_quant_type"])
def test_other_methods_are_not_covered(key):
    v = mutated(lambda c, t: c["quantization_config"].update({key: "wint4"}))
    (r,) = check(v, "fastdeploy")
    assert "cover the offline wint2 checkpoint" in r.rule


def test_dispatch_default_w4_end_layer_claims_the_coded_layers():
    """wint2.py::WINT2Config.from_config: no moe_w4_quant_config -> quant_end_layer 6, so MoE layers 1 and 2
    (layer_idx <= 6) go to wint4 though they hold the 2-bit code."""
    (r,) = check(mutated(lambda c, t: c["quantization_config"]["moe_quant_config"].pop("moe_w4_quant_config")), "fastdeploy")
    assert "layers [1, 2]" in r.what and "layers/quantization/wint2.py::WINT2Config.from_config" in r.source
    (r,) = check(mutated(lambda c, t: c["quantization_config"]["moe_quant_config"]["moe_w4_quant_config"].update(
        quant_end_layer=1)), "fastdeploy")
    assert "layers [1]" in r.what


def test_dispatch_of_wint4_experts_past_the_end_layer():
    """A w4/w2 export (wint4 experts in layer 1) read with moe_w4_quant_end_layer 0: layer 1 goes to wint2."""
    cfg = ErnieMoeConfig.from_dict(hf_config(DIMS, "float32"))
    config = fd.config_json(cfg.raw, fd.plan(cfg, layer_range_recipe("w4w2", [(1, 1, W4), (2, 2, CODE2)])))
    view = CheckpointView(config, {s.name: (s.dtype, tuple(s.shape)) for s, _ in fd.expected_tensors(config)})
    assert check(view, "fastdeploy") == []
    config["quantization_config"]["moe_quant_config"]["moe_w4_quant_config"]["quant_end_layer"] = 0
    (r,) = check(view, "fastdeploy")
    assert r.what == "MoE layers [1] hold wint4 experts, but moe_w4_quant_end_layer=0 dispatches them to the 2-bit code"
    assert "layers/quantization/wint2.py::WINT2Config.from_config, get_quant_method" in r.source


def test_router_in_hf_layout_is_refused():
    def edit(c, t):
        t["ernie.layers.1.mlp.gate.weight"] = (torch.float32, (8, 128))  # [E, H]: the Hub's layout
    (r,) = one_reason(mutated(edit), "models/ernie4_5_moe.py::Ernie4_5_MoE.__init__")
    assert "[8, 128] where FastDeploy declares float32 [128, 8]" in r.what


def test_model_prefix_is_one_reason():
    def edit(c, t):
        for n in list(t):
            t["model" + n[len("ernie"):] if n.startswith("ernie.") else n] = t.pop(n)
    (r,) = one_reason(mutated(edit), "utils.py::v1_loader_support")
    assert "model. prefix" in r.what


def test_unfused_qkv_is_refused_by_the_fused_rule():
    def edit(c, t):
        for leaf in ("quant_weight", "weight_scale"):
            t.pop(f"ernie.layers.0.self_attn.qkv_proj.{leaf}")
            for p in "qkv":
                t[f"ernie.layers.0.self_attn.{p}_proj.{leaf}"] = (torch.int8, (64, 128))
    reasons = one_reason(mutated(edit), "layers/linear.py::QKVParallelLinear")
    assert [r.what for r in reasons] == [f"missing tensor ernie.layers.0.self_attn.qkv_proj.{leaf}"
                                         for leaf in ("quant_weight", "weight_scale")]


def test_compressed_tensors_dense_leaves_break_is_quantized():
    def edit(c, t):
        for leaf in ("quant_weight", "weight_scale"):
            t.pop(f"ernie.layers.0.self_attn.o_proj.{leaf}")
        t["ernie.layers.0.self_attn.o_proj.weight_packed"] = (torch.int32, (128, 16))
    one_reason(mutated(edit), "layers/linear.py::LinearBase.__init__")


def test_scale_rows_are_k_over_128():
    """fused_moe_wint2_backend.py::Wint2MoeMethod.create_weights: moe_intermediate_size // 128 rows; quantkit's
    own ceil(K/128) rows at K = 64 do not fit (and would lose the last 64-group)."""
    def edit(c, t):
        c["moe_intermediate_size"] = 64
        for n in list(t):
            if ".experts." in n and n.endswith("down_proj.weight_scale"):
                t[n] = (torch.uint8, (1, 128))
    reasons = check(mutated(edit), "fastdeploy")
    assert any("moe_intermediate_size=64" in r.what for r in reasons)
    assert any("down_proj.weight_scale: uint8 [1, 128] where FastDeploy declares uint8 [0, 128]" in r.what
               and "fused_moe_wint2_backend.py::Wint2MoeMethod.create_weights" in r.source for r in reasons)


def test_super_scales_follow_the_model_dtype():
    def edit(c, t):
        c["dtype"] = "float16"
    reasons = check(mutated(edit), "fastdeploy")
    assert any("super_scales: bfloat16" in r.what and "float16" in r.what for r in reasons)


def test_routing_bias_without_aux_free_is_dropped():
    (r,) = one_reason(mutated(lambda c, t: c.pop("moe_use_aux_free")), "layers/moe/moe.py::FusedMoE.init_moe_weights")
    assert "2 routing biases" in r.what


def test_tensor_parallel_needs_presharded_directories():
    assert check(good_view(), "fastdeploy", tp=1) == []
    (r,) = one_reason(good_view(), "_get_tensor_parallel_mappings", tp=2)
    assert "tensor-parallel size 2" in r.what


def test_versions_name_the_revisions():
    assert "FastDeploy" in rules.VERSIONS and "wint2.py" in rules.VERSIONS
