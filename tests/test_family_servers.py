"""Each family's GPTQ w4g128 output read by the servers: ``quantkit check --server vllm`` (exit 0) and transformers'
own ``from_pretrained`` (the independent reader: its fp32 logits equal ``quantkit.load``'s)."""

import logging
import subprocess
import sys

import pytest
import torch

import quantkit
from quantkit.pipeline.quantize import CalibOptions, QuantizeOptions, quantize
from quantkit.quant.config import BUILTIN_RECIPES

FAMILIES = ["qwen3-moe-tiny", "qwen2-moe-tiny", "mixtral-tiny", "olmoe-tiny", "glm4-moe-tiny"]
OPTS = QuantizeOptions(progress=False, calib=CalibOptions(data="sotu:train", samples=4, seq_len=64))


@pytest.fixture(scope="module", params=FAMILIES)
def out(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "q"
    quantize(f"random:{request.param}", path, BUILTIN_RECIPES["w4g128"].with_method("gptq"), OPTS)
    return path


def test_vllm_rules_accept_every_family(out):
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "check", str(out), "--server", "vllm"],
                       check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vllm" in r.stdout


def test_transformers_reads_every_family(out):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("compressed_tensors").setLevel(logging.ERROR)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = quantkit.load(out, dtype="float32")
    ids = torch.randint(0, ref.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ref(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, diff


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
