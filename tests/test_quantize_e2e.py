"""quantize -> load -> run: exact dequant parity, checksums, crash safety, CLI and inspect."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import quantkit
from dequant_reference import dequantized_reference
from quantkit.nn.quantized import QuantExperts, QuantLinear
from quantkit.pipeline.quantize import QuantizeOptions, quantize
from quantkit.quant.config import BUILTIN_RECIPES

QUIET = QuantizeOptions(progress=False)


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "w4"
    quantize("random:ernie-tiny", out, BUILTIN_RECIPES["w4g128-asym"], QUIET)
    return out


@pytest.mark.parametrize("recipe", ["w4g128", "w4g128-asym", "w3g128", "w2g64"])
def test_quantized_logits_equal_fp_model_with_dequantized_weights(tmp_path, recipe):
    out = tmp_path / recipe
    report = quantize("random:ernie-tiny", out, BUILTIN_RECIPES[recipe], QUIET)
    q = quantkit.load(out)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 3 * 4 + 1 * 3 + 2 * 3  # attn, dense mlp, shared
    assert sum(isinstance(m, QuantExperts) for m in q.modules()) == 2
    ref = dequantized_reference(q, "random:ernie-tiny")
    ids = torch.randint(0, 320, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (q(ids) - ref(ids)).abs().max().item() <= 1e-5
    assert report["quantized_weights"] > 0.85 * report["total_weights"]
    bits = {"w4g128": 4, "w4g128-asym": 4, "w3g128": 3, "w2g64": 2}[recipe]
    assert bits < report["bits_per_weight_quantized"] < bits + 1.2  # + fp32 scales (and zeros) per group of 64


def test_output_layout(q4):
    files = sorted(p.name for p in q4.iterdir())
    assert files == ["config.json", "model.safetensors", "quantize_report.json", "quantkit.json", "tokenizer.json", "tokenizer_config.json"]
    qc = json.loads((q4 / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert "lm_head" in qc["ignore"]
    from safetensors import safe_open

    with safe_open(q4 / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight_packed" in keys  # per-expert Hub names
    assert "model.layers.1.mlp.gate.weight" in keys and "model.layers.1.mlp.moe_statics.e_score_correction_bias" in keys
    assert not any(k.endswith(".weight") and "proj" in k for k in keys)


def test_sharded_output_loads_the_same(tmp_path, q4):
    quantize("random:ernie-tiny", tmp_path / "s", BUILTIN_RECIPES["w4g128-asym"], QuantizeOptions(max_shard_bytes=50_000, progress=False))
    assert len(list((tmp_path / "s").glob("model-*-of-*.safetensors"))) > 3
    ids = torch.arange(30)[None]
    assert torch.equal(quantkit.load(tmp_path / "s")(ids), quantkit.load(q4)(ids))


def test_corrupt_and_truncated_shards_are_caught(tmp_path, q4):
    bad = tmp_path / "bad"
    shutil.copytree(q4, bad)
    f = bad / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(quantkit.QuantkitError, match="sha256 mismatch"):
        quantkit.load(bad)
    quantkit.load(bad, verify=False)  # the user may skip the check
    f.write_bytes(bytes(data[:-64]))
    with pytest.raises(quantkit.QuantkitError, match="truncated"):
        quantkit.load(bad, verify=False)


def test_a_crash_leaves_nothing_that_looks_like_a_checkpoint(tmp_path, monkeypatch):
    import quantkit.pipeline.layer_quant as pipeline

    calls = {"n": 0}
    real = pipeline.rtn

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] > 20:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "rtn", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        quantize("random:ernie-tiny", tmp_path / "out", BUILTIN_RECIPES["w4g128"], QUIET)
    assert [p.name for p in tmp_path.iterdir()] == [".out.partial"]  # hidden, resumable, no config.json
    assert not (tmp_path / ".out.partial" / "config.json").exists()


CALIB = dict(data="sotu:train", samples=4, seq_len=64)


def checkpoint_bytes(d):
    return {f.name: f.read_bytes() for f in sorted(d.iterdir()) if f.name != "quantize_report.json"}


@pytest.mark.parametrize("fp_target", [False, True])  # True: the fp hidden-state stream is persisted and reopened too
def test_resume_after_failure_is_byte_identical(tmp_path, monkeypatch, fp_target):
    from dataclasses import replace

    from quantkit.pipeline.quantize import CalibOptions

    opts = QuantizeOptions(progress=False, calib=CalibOptions(**CALIB))
    recipe = BUILTIN_RECIPES["w2g64"].with_method("gptq")
    recipe = replace(recipe, rules=tuple((p, replace(r, fp_target=fp_target)) for p, r in recipe.rules))
    quantize("random:ernie-tiny", tmp_path / "ref", recipe, opts)

    import quantkit.pipeline.quantize as pipeline

    real = pipeline.quantize_layer

    def dies_on_layer_2(layer, prefix, *a, **k):
        if prefix == "model.layers.2":
            raise MemoryError("simulated")
        return real(layer, prefix, *a, **k)

    monkeypatch.setattr(pipeline, "quantize_layer", dies_on_layer_2)
    with pytest.raises(MemoryError):
        quantize("random:ernie-tiny", tmp_path / "out", recipe, opts)
    monkeypatch.setattr(pipeline, "quantize_layer", real)
    with pytest.raises(quantkit.QuantkitError, match="different source, recipe"):
        quantize("random:ernie-tiny", tmp_path / "out", BUILTIN_RECIPES["w4g128"].with_method("gptq"), opts, resume_run=True)
    # the mismatched attempt must not have destroyed the resumable state
    report = quantize("random:ernie-tiny", tmp_path / "out", recipe, opts, resume_run=True)
    assert checkpoint_bytes(tmp_path / "out") == checkpoint_bytes(tmp_path / "ref")
    assert len(report["layers"]) == 3 and not (tmp_path / ".out.partial").exists()


KILLER = """
import os, signal, sys
import quantkit.pipeline.quantize as q
real = q.quantize_layer
def die(layer, prefix, *a, **k):
    if prefix == "model.layers.2":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(layer, prefix, *a, **k)
q.quantize_layer = die
from quantkit.cli import main
main(sys.argv[1:])
"""


def test_kill_minus_9_then_resume_cli(tmp_path):
    args = ["quantize", "random:ernie-tiny", "--method", "awq+gptq", "--recipe", "w4g128", "--calib", "sotu:train",
            "--calib-samples", "4", "--calib-seq-len", "64"]
    r = subprocess.run([sys.executable, "-c", KILLER, *args, "-o", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == -9 and not (tmp_path / "out").exists()
    assert json.loads((tmp_path / ".out.partial" / ".resume.json").read_text())["layers_done"] == 1
    r = run_cli(*args, "-o", str(tmp_path / "out"), "--resume")
    assert r.returncode == 0, r.stderr
    r = run_cli(*args, "-o", str(tmp_path / "ref"))
    assert r.returncode == 0, r.stderr
    assert checkpoint_bytes(tmp_path / "out") == checkpoint_bytes(tmp_path / "ref")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True, env=dict(os.environ))


def test_cli_quantize_eval_inspect(tmp_path):
    out = tmp_path / "o"
    r = run_cli("quantize", "random:ernie-tiny", "-o", str(out), "--recipe", "w4g128")
    assert r.returncode == 0, r.stderr
    assert "bits/weight" in r.stdout and (out / "quantize_report.json").exists()
    r = run_cli("quantize", "random:ernie-tiny", "-o", str(out), "--bits", "2")
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("quantize", "random:ernie-tiny", "-o", str(out), "--bits", "2", "--group-size", "64", "--force")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "quantize_report.json").read_text())["recipe"] == "w2g64-asym"
    (tmp_path / "t.txt").write_text("some words to score " * 50)
    r = run_cli("eval", "perplexity", str(out), "--data", str(tmp_path / "t.txt"), "--seq-len", "128", "--max-windows", "2")
    assert r.returncode == 0 and "perplexity" in r.stdout, r.stderr
    r = run_cli("inspect", str(out))
    assert r.returncode == 0 and "int2 g64 asym" in r.stdout and "mlp.gate (float32)" in r.stdout
    r = run_cli("quantize", str(out), "-o", str(tmp_path / "again"))
    assert r.returncode == 2 and "already quantized" in r.stderr
    r = run_cli("quantize", "random:ernie-tiny", "-o", str(tmp_path / "x"), "--recipe", "nope")
    assert r.returncode == 2 and "unknown recipe" in r.stderr


def test_dry_run_plans_without_writing(tmp_path):
    r = run_cli("quantize", "random:ernie-tiny", "-o", str(tmp_path / "o"), "--method", "gptq", "--recipe", "w2g64", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "27 modules quantized" in r.stdout and "group 64 does not divide K=32" in r.stdout and "peak host memory" in r.stdout
    assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []
    from quantkit.pipeline.dry_run import dry_run

    est = dry_run("random:ernie-tiny", BUILTIN_RECIPES["w4g128"], QUIET)
    report = quantize("random:ernie-tiny", tmp_path / "real", BUILTIN_RECIPES["w4g128"], QUIET)
    assert est["output_bytes"] == sum(f.stat().st_size for f in (tmp_path / "real").glob("*.safetensors")) - \
        sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in (tmp_path / "real").glob("*.safetensors"))
    assert report["size_bytes"] > est["output_bytes"]
