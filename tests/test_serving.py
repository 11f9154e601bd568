"""``quantkit check --server`` / ``quantize --server``: vLLM's and quantkit's own loader rules, on real quantkit
checkpoints and on small hand-made ones (config.json + safetensors headers). Every rule cites its upstream
source (``quantkit/serving/vllm.py``); the tests pin that each verdict names the rule that fires."""

import json
import subprocess
import sys

import pytest

from quantkit.pipeline.dry_run import dry_run
from quantkit.pipeline.quantize import QuantizeOptions, quantize
from quantkit.quant.config import get_recipe
from quantkit.serving import CheckpointView, check
from quantkit.sources.random_models import ERNIE_21B_A3B
from random_src import WIDE, write_src

DIMS = WIDE
QUIET = QuantizeOptions(progress=False)
CLI = [sys.executable, "-m", "quantkit.cli"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_src(tmp_path_factory, DIMS, dtype="bfloat16")


@pytest.fixture(scope="module")
def views(src, tmp_path_factory):
    """{recipe: CheckpointView} of real RTN checkpoints."""
    base = tmp_path_factory.mktemp("q")
    out = {}
    for r in ("w4g128", "w8", "w4g128-asym", "w3g128", "w2g64", "w2code"):
        quantize(str(src), base / r, get_recipe(r), QUIET)
        out[r] = CheckpointView.from_dir(base / r)
    return out


def _rules(reasons):
    return {r.what for r in reasons}


@pytest.mark.parametrize("recipe", ["w4g128", "w8"])
def test_vllm_loads_symmetric_4_and_8_bit(views, recipe):
    assert check(views[recipe], "vllm") == []


@pytest.mark.parametrize("recipe,rule,source", [
    ("w3g128", "3-bit int weights", "WNA16_SUPPORTED_BITS"),
    ("w2g64", "2-bit int weights", "WNA16_SUPPORTED_BITS"),
    ("w2code", "2-bit code (CCQ/WINT2) experts", "ernie45_moe.py::load_weights"),
    ("w4g128-asym", "asymmetric MoE experts", "compressed_tensors_moe_wna16_marlin.py"),
])
def test_vllm_refuses_with_the_rule_named(views, recipe, rule, source):
    reasons = check(views[recipe], "vllm")
    hits = [r for r in reasons if r.what == rule]
    assert hits and all(source in r.source for r in hits), reasons


def test_vllm_asymmetric_dense_layers_are_fine(views):
    """Only the MoE experts trip the symmetric-only rule; asymmetric dense layers have a WNA16 scheme."""
    reasons = check(views["w4g128-asym"], "vllm")
    assert {r.where.rsplit(".", 1)[-1] for r in reasons} == {"experts"}


@pytest.mark.parametrize("recipe", ["w4g128", "w8", "w4g128-asym", "w3g128", "w2g64", "w2code"])
def test_quantkit_loads_every_recipe(views, recipe):
    assert check(views[recipe], "quantkit") == []


def test_unquantized_source_loads_everywhere_it_should(src):
    view = CheckpointView.from_dir(src)
    assert check(view, "vllm") == [] and check(view, "quantkit") == []


# -- hand-made checkpoints: one defect each ---------------------------------------------------------------

def _edit(view, config=None, drop=(), reshape=None):
    cfg = json.loads(json.dumps(view.config))
    if config:
        config(cfg)
    tensors = {n: v for n, v in view.tensors.items() if n not in drop}
    for n, shape in (reshape or {}).items():
        tensors[n] = (tensors[n][0], shape)
    return CheckpointView(cfg, tensors)


def test_ignore_entry_that_matches_nothing_leaves_a_layer_without_target(views):
    """The V5 bug shape: an ignore regex missing the per-expert index matches no module, so the module is
    neither ignored nor targeted."""
    def broken(cfg):
        q = cfg["quantization_config"]
        q["ignore"] = [p.replace(r"\.\d+\.", ".") for p in q["ignore"]]
        q["config_groups"] = {k: g for k, g in q["config_groups"].items()
                              if not any("experts" in t for t in g["targets"])}
    reasons = check(_edit(views["w4g128"], broken), "vllm")
    assert "no matching target" in _rules(reasons)
    assert any("find_matched_target" in r.source for r in reasons)


def test_moe_projections_with_different_groups_are_refused(views):
    def split(cfg):
        groups = cfg["quantization_config"]["config_groups"]
        g = next(g for g in groups.values() if any("experts" in t for t in g["targets"]))
        down = [t for t in g["targets"] if "experts" in t and "down_proj" in t]
        g["targets"] = [t for t in g["targets"] if t not in down]
        groups["extra"] = {**g, "targets": down, "weights": {**g["weights"], "group_size": 32}}
    assert "MoE projections with different schemes" in _rules(check(_edit(views["w4g128"], split), "vllm"))


def test_fused_qkv_with_different_schemes_is_refused(views):
    def split(cfg):
        groups = cfg["quantization_config"]["config_groups"]
        g = next(g for g in groups.values() if any("self_attn" in t for t in g["targets"]))
        k = [t for t in g["targets"] if "k_proj" in t]
        g["targets"] = [t for t in g["targets"] if t not in k]
        groups["extra"] = {**g, "targets": k, "weights": {**g["weights"], "num_bits": 8}}
    reasons = check(_edit(views["w4g128"], split), "vllm")
    assert any(r.what == "fused shards with different schemes" and r.where.endswith("qkv_proj") for r in reasons)


def test_missing_scale_is_refused_by_both(views):
    name = next(n for n in views["w4g128"].tensors if n.endswith("o_proj.weight_scale"))
    bad = _edit(views["w4g128"], drop=[name])
    assert "missing quantized tensor" in _rules(check(bad, "vllm"))
    assert check(bad, "quantkit") and "missing" in check(bad, "quantkit")[0].rule


def test_wrong_shape_is_refused_by_quantkit(views):
    name = next(n for n in views["w4g128"].tensors if n.endswith("o_proj.weight_packed"))
    n, w = views["w4g128"].tensors[name][1]
    reasons = check(_edit(views["w4g128"], reshape={name: (n, w + 1)}), "quantkit")
    assert [r.where for r in reasons] == [name]


def test_other_writers_linear_class_target(views):
    """compressed-tensors writers often target the class ``Linear``; with the router ignored that loads."""
    def linear(cfg):
        q = cfg["quantization_config"]
        g = next(iter(q["config_groups"].values()))
        q["config_groups"] = {"group_0": {**g, "targets": ["Linear"]}}
    view = _edit(views["w8"], linear)
    assert check(view, "vllm") == []


def test_unknown_quant_method_and_architecture(views):
    def fd(cfg):
        cfg["quantization_config"] = {"quantization": "wint2"}
    assert _rules(check(_edit(views["w4g128"], fd), "vllm")) == {"quantization method"}

    def arch(cfg):
        cfg["architectures"] = ["LlamaForCausalLM"]
    assert _rules(check(_edit(views["w4g128"], arch), "vllm")) == {"architecture"}


# -- tensor parallelism at ERNIE-4.5-21B-A3B dimensions, from the plan alone (dry run: config.json only) ----

@pytest.fixture(scope="module")
def big(tmp_path_factory):
    path = tmp_path_factory.mktemp("21b")
    cfg = {"architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "torch_dtype": "bfloat16",
           "tie_word_embeddings": True, "num_hidden_layers": 2, **ERNIE_21B_A3B}
    cfg["num_hidden_layers"] = 2
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("tp,ok", [(1, True), (2, True), (4, True), (8, False)])
def test_vllm_tensor_parallel_rules_at_21b_dims(big, tp, ok):
    r = dry_run(str(big), get_recipe("w4g128"), QuantizeOptions(progress=False, tp=tp))
    if ok:
        assert r["servers"]["vllm"] == []
    else:  # 20 heads over 8 ranks, and the experts' down_proj K 1536/8 = 192 is 1.5 groups of 128
        text = " ".join(r["servers"]["vllm"])
        assert "20 heads" in text and "group straddles" in text and "mlp.experts" in text


# -- the command line -------------------------------------------------------------------------------------

def test_quantize_server_refuses_before_any_work(src, tmp_path):
    out = tmp_path / "o"
    p = subprocess.run([*CLI, "quantize", str(src), "-o", str(out), "--recipe", "w2g64", "--server", "vllm",
                        "--method", "gptq", "--calib", "sotu:train"], capture_output=True, text=True)
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: vllm could not load") and "WNA16_SUPPORTED_BITS" in err[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_check_cli_exit_codes(views, src, tmp_path):
    out = tmp_path / "w2"
    quantize(str(src), out, get_recipe("w2g64"), QUIET)
    p = subprocess.run([*CLI, "check", str(out), "--server", "vllm"], capture_output=True, text=True)
    assert p.returncode == 1 and all(line.startswith("vllm: no: ") for line in p.stdout.splitlines()), p.stdout
    p = subprocess.run([*CLI, "check", str(src), "--server", "vllm", "--server", "quantkit"], capture_output=True, text=True)
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 2 and "loads" in p.stdout
    p = subprocess.run([*CLI, "check", str(src), "--server", "sglang"], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error: unknown server")


def test_dry_run_prints_every_servers_verdict(src):
    p = subprocess.run([*CLI, "quantize", str(src), "-o", "unused", "--recipe", "w2code", "--dry-run"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "vllm: no: 2-bit code" in p.stdout and "quantkit: yes" in p.stdout


def test_moe_activation_order_needs_marlin(views):
    """Hidden 128 and expert width 64 fit Marlin MoE at g64; at tp=2 the width per rank (32) does not, and
    vLLM's Triton fallback refuses actorder=group."""
    def actorder(cfg):
        for g in cfg["quantization_config"]["config_groups"].values():
            g["weights"]["actorder"] = "group"
    view = _edit(views["w4g128"], actorder)
    assert "activation order without Marlin" not in _rules(check(view, "vllm"))
    assert "activation order without Marlin" in _rules(check(view, "vllm", tp=2))


def test_trellis_experts_are_quantkit_only(src, tmp_path):
    out = tmp_path / "w2trellis"
    quantize(str(src), out, get_recipe("benchmarks/recipes/w2trellis-L8-experts-only.json"), QUIET)
    view = CheckpointView.from_dir(out)
    assert "trellis code experts" in _rules(check(view, "vllm"))
    assert check(view, "quantkit") == []
    assert check(view, "transformers") and check(view, "fastdeploy")
