"""NaN/Inf in the source, or calibration activations that overflow: one error line naming the tensor or
layer, and nothing written (no output directory, no partial one)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


def _source(tmp_path: Path, tiny_dir: Path, edit) -> Path:
    """A copy of random:ernie-tiny whose tensors went through ``edit(dict)``."""
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    return src


def _quantize(src: Path, cwd: Path, *args):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", str(src), "-o", "out", *args],
                          capture_output=True, text=True, cwd=cwd, env=env)


def _assert_refused(r, cwd: Path, code: int, *texts: str):
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("[quantkit]", "quantize:"))]
    assert r.returncode == code, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for t in texts:
        assert t in lines[0], lines[0]
    assert sorted(p.name for p in cwd.iterdir()) == ["src"]  # no out/, no .out.partial


CALIB = ["--calib", "sotu:train", "--calib-samples", "4", "--calib-seq-len", "32"]


def _nan_expert(t):
    t["model.layers.1.mlp.experts.3.up_proj.weight"][5, 7] = float("nan")


def _inf_norm(t):
    t["model.layers.2.post_attention_layernorm.weight"][0] = float("inf")


def _inf_embedding(t):
    t["model.embed_tokens.weight"][3, 1] = -float("inf")


@pytest.mark.parametrize("edit,name", [(_nan_expert, "model.layers.1.mlp.experts.3.up_proj.weight"),
                                       (_inf_norm, "model.layers.2.post_attention_layernorm.weight"),
                                       (_inf_embedding, "model.embed_tokens.weight")], ids=["nan-expert", "inf-norm", "inf-embed"])
def test_rtn_refuses_a_non_finite_source_tensor(tmp_path, tiny_dir, edit, name):
    src = _source(tmp_path, tiny_dir, edit)
    _assert_refused(_quantize(src, tmp_path, "--recipe", "w4g128"), tmp_path, 2, f"source tensor {name} ", "non-finite")


def test_calibrated_run_refuses_a_non_finite_source_tensor(tmp_path, tiny_dir):
    src = _source(tmp_path, tiny_dir, _nan_expert)
    _assert_refused(_quantize(src, tmp_path, "--recipe", "w4g128", "--method", "gptq", *CALIB), tmp_path, 2,
                    "source tensor model.layers.1.mlp.experts.3.up_proj.weight ")


def test_calibrated_run_refuses_overflowing_activations(tmp_path, tiny_dir):
    def blow_up(t):  # finite fp32 weights whose products pass fp32's 3.4e38
        w = t["model.layers.1.mlp.shared_experts.up_proj.weight"]
        t["model.layers.1.mlp.shared_experts.up_proj.weight"] = w / w.abs().max() * 1e38

    src = _source(tmp_path, tiny_dir, blow_up)
    assert all(bool(torch.isfinite(v).all()) for v in load_file(src / "model.safetensors").values())
    _assert_refused(_quantize(src, tmp_path, "--recipe", "w4g128", "--method", "gptq", *CALIB), tmp_path, 1,
                    "calibration activations overflow", "model.layers.1.mlp.shared_experts.down_proj")


def test_resumed_partial_is_removed_too(tmp_path, tiny_dir):
    src = _source(tmp_path, tiny_dir, _inf_norm)
    (tmp_path / ".out.partial").mkdir()  # as an interrupted earlier run leaves it
    _assert_refused(_quantize(src, tmp_path, "--recipe", "w4g128", "--resume"), tmp_path, 2,
                    "model.layers.2.post_attention_layernorm.weight")
