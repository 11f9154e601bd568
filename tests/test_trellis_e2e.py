"""quantize with the trellis code (w2trellis) -> load -> run; recipe files; inspect names the scheme."""

import json

import pytest
import torch

import quantkit
from dequant_reference import dequantized_reference, expert_weights
from quantkit.errors import UsageError
from quantkit.inspect import format_inspect, inspect_checkpoint
from quantkit.model.safetensors_io import CheckpointReader
from quantkit.nn.trellis import TrellisStack
from quantkit.pipeline.quantize import CalibOptions, QuantizeOptions, quantize
from quantkit.quant.config import Recipe, Rule, get_recipe, make_plan
from quantkit.model.config import ErnieMoeConfig
from quantkit.sources.random_models import hf_config
from random_src import WIDE, write_src

DIMS = WIDE
L = 8  # the CPU setting: the tests check plumbing and layout, the benchmark measures quality at L = 16


def _recipe(method="rtn") -> Recipe:
    return Recipe.from_dict({"name": "w2trellis-L8", "rules": [
        {"pattern": r"mlp\.experts\.", "format": "trellis", "bits": 2, "state_bits": L, "method": method},
        {"pattern": ".*", "bits": 4, "group_size": 128, "method": method}]})


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_src(tmp_path_factory, DIMS)


@pytest.fixture(scope="module")
def out(src, tmp_path_factory):
    o = tmp_path_factory.mktemp("trellis") / "q"
    return o, quantize(str(src), o, _recipe(), QuantizeOptions(progress=False))


def test_logits_equal_fp_model_with_dequantized_weights(src, out):
    path, report = out
    q = quantkit.load(path)
    assert sum(isinstance(m, TrellisStack) for m in q.modules()) == 3 * 2  # 3 projections x 2 MoE layers
    ref = dequantized_reference(q, src)
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (q(ids) - ref(ids)).abs().max().item() <= 1e-5
    parts = report["bits_per_weight_parts"]
    assert set(parts) == {"w2trellis-L8 (routed experts)", "w4g128-sym"}
    # every stored byte: 2 bits + fp16 suh/svh per row and column, gate/up [64, 128] and down [128, 64]
    assert parts["w2trellis-L8 (routed experts)"]["bits_per_weight"] == pytest.approx(2 + 16 * 192 / (64 * 128))
    names = set(CheckpointReader(path).names())
    assert {"model.layers.1.mlp.experts.3.down_proj.trellis", "model.layers.1.mlp.experts.3.down_proj.suh",
            "model.layers.1.mlp.experts.3.down_proj.svh"} <= names
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    block = qc["quantkit_trellis"]
    assert block["modules"]["model.layers.1.mlp.experts.up_proj"] == {"bits": 2, "state_bits": L}
    assert any("experts" in p and "down_proj" in p for p in qc["ignore"])  # not a compressed-tensors group


def test_decoded_experts_are_the_source_experts(src, out):
    q, ref = quantkit.load(out[0]), quantkit.load(src)
    name = "model.layers.2.mlp.experts"
    srcs = {p: getattr(ref.get_submodule(name), p).float() for p in ("gate_proj", "up_proj", "down_proj")}
    for proj in srcs:
        got = expert_weights(q.get_submodule(name), proj)
        for e in range(DIMS["moe_num_experts"]):
            own = ((got[e] - srcs[proj][e]).norm() / srcs[proj][e].norm()).item()
            assert own < 0.32  # Gaussian weights at L = 8: relative error about sqrt(0.085)
            others = [((got[e] - w[f]).norm() / w[f].norm()).item() for p, w in srcs.items() if w.shape == got.shape
                      for f in range(DIMS["moe_num_experts"]) if (p, f) != (proj, e)]
            assert min(others) > 1.2


def test_inspect_names_the_scheme(out):
    r = inspect_checkpoint(str(out[0]))
    text = format_inspect(r)
    assert "trellis code: trellis v1" in text and "read by quantkit only" in text
    assert any(k.startswith("trellis 2-bit L8") for k in r["bits_per_weight_parts"])
    assert r["quantized"]["mlp.experts.*.down_proj"] == {"trellis 2-bit L8 (QTIP/EXL3-class, MUL1, Hadamard)": 8 * 2}


def test_hessian_aware_trellis_runs_and_lowers_the_layer_error(src, tmp_path):
    calib = CalibOptions(data="sotu:train", samples=4, seq_len=64, expert_calibration="all")
    rep = quantize(str(src), tmp_path / "q", _recipe("gptq"), QuantizeOptions(progress=False, calib=calib))
    errs = rep["layers"][1]["errors"]["mlp.experts.down_proj"]
    assert len(errs) == DIMS["moe_num_experts"] and max(errs) < 0.2
    q = quantkit.load(tmp_path / "q")
    assert sum(isinstance(m, TrellisStack) for m in q.modules()) == 6


def test_seed_draws_other_signs_of_the_same_scales(src, out, tmp_path):
    """A rule's ``seed`` reaches the encoder: other incoherence signs, the same magnitudes (they come from W)."""
    recipe = Recipe.from_dict({"name": "w2trellis-L8-seed1", "rules": [
        {"pattern": r"mlp\.experts\.", "format": "trellis", "bits": 2, "state_bits": L, "seed": 1},
        {"pattern": ".*", "bits": 4, "group_size": 128}]})
    quantize(str(src), tmp_path / "s1", recipe, QuantizeOptions(progress=False))
    name = "model.layers.1.mlp.experts.3.down_proj.suh"
    a, b = CheckpointReader(out[0]).read(name), CheckpointReader(tmp_path / "s1").read(name)
    assert torch.equal(a.abs(), b.abs()) and not torch.equal(a, b)


def test_recipe_rules():
    r = get_recipe("w2trellis")
    assert r.rule_for("model.layers.3.mlp.experts.up_proj").label == "w2trellis"
    assert r.rule_for("model.layers.3.self_attn.q_proj").label == "w4g128-sym"
    assert Rule.from_dict({"format": "trellis", "bits": 3, "state_bits": 12}).label == "w3trellis-L12"
    assert Rule(format="trellis", bits=2, group_size=None).to_dict()["state_bits"] == 16
    assert "state_bits" not in Rule().to_dict()
    assert Rule(format="trellis", bits=2, group_size=None).to_dict()["seed"] == 0
    assert Rule.from_dict({"format": "trellis", "seed": 3}).seed == 3 and "seed" not in Rule().to_dict()
    for bad in ({"format": "trellis", "bits": 8}, {"format": "trellis", "state_bits": 20}, {"bits": 4, "state_bits": 12},
                {"format": "trellis", "seed": -1}, {"bits": 4, "seed": 1}):
        with pytest.raises(UsageError):
            Rule.from_dict(bad)
    with pytest.raises(UsageError, match="routed experts only"):
        make_plan(ErnieMoeConfig.from_dict(hf_config(DIMS, "float32")), Recipe.from_dict({"rules": [{"pattern": ".*", "format": "trellis"}]}))


def test_triton_backend_runs_the_trellis_kernels(out, monkeypatch):
    """backend="triton" (the interpreter here): the experts go through ``kernels.trellis.trellis_moe`` and the
    logits agree with the torch path."""
    from quantkit.kernels import trellis as tk

    calls = []
    real = tk.trellis_moe
    monkeypatch.setattr(tk, "trellis_moe", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = quantkit.load(out[0], backend="torch")(ids)
        got = quantkit.load(out[0], backend="triton")(ids)
    assert len(calls) == 2  # one per MoE layer
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
