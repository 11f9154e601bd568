"""quantize with the 2-bit code -> load -> run; CLI and inspect (FastDeploy's layout: test_fastdeploy_export.py)."""

import subprocess
import sys

import pytest
import torch

import quantkit
from dequant_reference import dequantized_reference, expert_weights
from quantkit.errors import UsageError
from quantkit.model.safetensors_io import CheckpointReader
from quantkit.nn.code2 import Code2Stack
from quantkit.pipeline.quantize import CalibOptions, QuantizeOptions, quantize
from quantkit.quant.config import get_recipe
from random_src import WIDE, write_src

DIMS = WIDE


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_src(tmp_path_factory, DIMS)


@pytest.fixture(scope="module")
def outs(src, tmp_path_factory):
    """The demo recipe in quantkit's layout: {export: (output dir, report)}."""
    base = tmp_path_factory.mktemp("w2code")
    return {e: (base / e, quantize(str(src), base / e, get_recipe("w2code"), QuantizeOptions(progress=False, export=e)))
            for e in ("quantkit",)}


@pytest.mark.parametrize("export", ["quantkit"])
def test_w2code_logits_equal_fp_model_with_dequantized_weights(src, outs, export):
    out, report = outs[export]
    q = quantkit.load(out)
    assert sum(isinstance(m, Code2Stack) for m in q.modules()) == 3 * 2
    ref = dequantized_reference(q, src)
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (q(ids) - ref(ids)).abs().max().item() <= 1e-5
    parts = report["bits_per_weight_parts"]
    assert set(parts) == {"w2code (routed experts)", "w4g128-sym"}


@pytest.mark.parametrize("export", ["quantkit"])
def test_decoded_experts_are_the_source_experts(src, outs, export):
    """Each decoded expert projection is close to its own source weight and far from any other one (a swapped
    gate/up, a wrong expert order or transposition in writer and loader alike would fail here)."""
    q, ref = quantkit.load(outs[export][0]), quantkit.load(src)
    name = "model.layers.2.mlp.experts"
    srcs = {p: getattr(ref.get_submodule(name), p).float() for p in ("gate_proj", "up_proj", "down_proj")}
    for proj in srcs:
        got = expert_weights(q.get_submodule(name), proj)
        for e in range(DIMS["moe_num_experts"]):
            own = ((got[e] - srcs[proj][e]).norm() / srcs[proj][e].norm()).item()
            assert own < 0.45  # the 2-bit code on Gaussian weights: relative error about sqrt(0.104)
            for other_p, w in srcs.items():
                if w.shape == got.shape:
                    for f in range(DIMS["moe_num_experts"]):
                        if (other_p, f) != (proj, e):
                            assert ((got[e] - w[f]).norm() / w[f].norm()).item() > 1.2


def test_w2code_gptq_uses_the_hessian_in_the_pipeline(tmp_path, src, outs):
    calib = CalibOptions(data="sotu:train", samples=4, seq_len=64, expert_calibration="all")
    rep = quantize(str(src), tmp_path / "g", get_recipe("w2code").with_method("gptq"), QuantizeOptions(progress=False, calib=calib))
    errs = rep["layers"][1]["errors"]["mlp.experts.gate_proj"]
    assert len(errs) == DIMS["moe_num_experts"] and all(0 < e < 1 for e in errs)
    plain, aware = CheckpointReader(outs["quantkit"][0]), CheckpointReader(tmp_path / "g")
    p = "model.layers.1.mlp.experts.0.gate_proj"
    # same scales and codebooks (the encoder picks them from the weights alone), codes re-chosen under H
    assert torch.equal(plain.read(f"{p}.code_scale"), aware.read(f"{p}.code_scale"))
    assert not torch.equal(plain.read(f"{p}.quant_weight"), aware.read(f"{p}.quant_weight"))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True, timeout=600)


def test_cli_quantize_and_inspect(tmp_path, src):
    out = tmp_path / "o"
    r = run_cli("quantize", str(src), "-o", str(out), "--recipe", "w2code")
    assert r.returncode == 0, r.stderr
    assert "w2code (routed experts)" in r.stdout
    r = run_cli("inspect", str(out))
    assert r.returncode == 0 and "ccq_wint2" in r.stdout and "2-bit code" in r.stdout and "bits/weight" in r.stdout


def test_bad_requests_are_usage_errors(tmp_path, src):
    with pytest.raises(UsageError, match="multiple of 64"):
        quantize("random:ernie-tiny", tmp_path / "x", get_recipe("w2code"), QuantizeOptions(progress=False))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("export", ["quantkit"])
def test_triton_backend_matches_torch(outs, export, monkeypatch):
    """The fused-MoE kernels read the coded experts and agree with the torch path (Triton's interpreter on CPU)."""
    pytest.importorskip("triton")
    from quantkit.kernels import fused_moe as fm

    calls = []
    real = fm.fused_moe
    monkeypatch.setattr(fm, "fused_moe", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ids = torch.randint(0, DIMS["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.no_grad():
        ref = quantkit.load(outs[export][0], device=dev, backend="torch")(ids).double()
        out = quantkit.load(outs[export][0], device=dev, backend="triton")(ids).double()
    assert len(calls) == 2  # the two MoE layers, both through the kernels
    assert ((out - ref).norm() / ref.norm()).item() < 1e-4
