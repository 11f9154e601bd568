"""The GPU benchmark scripts run end to end on CPU (``--tiny``: Triton's interpreter, tiny shapes), so a GPU
session does not find them broken. Their times here are not measurements; only the rows' presence is checked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_tiny(script: str, tmp_path, *extra) -> dict:
    out = tmp_path / "out.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny", "--json", str(out), *extra],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_kernels_benchmark_runs(tmp_path):
    rows = run_tiny("kernels.py", tmp_path)["rows"]
    dense = {(r["shape"], r["m"], r["method"]) for r in rows if r["kind"] == "dense" and "us" in r}
    assert {("q_proj", m, meth) for m in (1, 3, 33) for meth in ("bf16", "w4g128", "w2code")} <= dense
    moe = {(r["m"], r["method"], r["mode"]) for r in rows if r["kind"] == "moe"}
    for m in (1, 3, 33):
        assert {(m, "bf16", "eager"), (m, "bf16-grouped", "graph"), (m, "w4g128", "graph"), (m, "w2code", "eager")} <= moe
    assert all(r["us"] > 0 and r["speedup_vs_grouped"] > 0 for r in rows if r["kind"] == "moe")


@pytest.mark.slow
def test_decode_benchmark_runs(tmp_path):
    rows = run_tiny("decode.py", tmp_path)["rows"]
    assert {(r["scheme"], r["batch"]) for r in rows} == {(s, b) for s in ("bf16", "bf16-grouped", "w4g128", "w2code")
                                                         for b in (1, 16)}
    assert all(r["eager_tok_s"] > 0 and (r["graph_tok_s"] is None) == (r["scheme"] == "bf16") for r in rows)


@pytest.mark.slow
def test_tune_script_runs(tmp_path):
    rows = run_tiny("tune.py", tmp_path)["rows"]
    assert {(r["kind"], r["format"], r["m"]) for r in rows} >= {("moe", f, m) for f in ("w4g128", "w2code") for m in (1, 33)}
    assert all(r["best_us"] is not None and r["gain"] >= 1 for r in rows)
