"""DeepSeek-V3 downstream: ``random:deepseek-v3-tiny`` (Hub layout, MLA with q_lora, yarn) -> RTN / GPTQ / AWQ w4 ->
the family's Hub names -> ``quantkit.load`` (logits equal the source with dequantized weights) -> perplexity; the
CLI's quantize, eval, ``--dry-run`` and ``inspect``, transformers reading the output, the Triton backend; the MLA linears as candidates, the fused q_a/kv_a rule, and
AWQ's MLA smoothing groups leaving the fp layer's output unchanged."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch
from dequant_reference import dequantized_reference
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import quantkit
from quantkit.calib.capture import capture_layer
from quantkit.errors import UsageError
from quantkit.evals.perplexity import evaluate_perplexity
from quantkit.kernels import dispatch
from quantkit.model.causal_lm import MoeForCausalLM
from quantkit.model.config import MoeConfig
from quantkit.nn.quantized import QuantExperts, QuantLinear
from quantkit.pipeline.awq_apply import apply_awq
from quantkit.pipeline.quantize import CalibOptions, QuantizeOptions, quantize
from quantkit.quant.config import (
    BUILTIN_RECIPES,
    Recipe,
    Rule,
    candidate_modules,
    make_plan,
)
from quantkit.sources.random_families import family_config

SRC = "random:deepseek-v3-tiny"
OPTS = QuantizeOptions(progress=False, calib=CalibOptions(data="sotu:train", samples=4, seq_len=64))
MLA = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
N_LINEAR = 3 * len(MLA) + 3 + 2 * 3  # attention of 3 layers, the dense MLP of layer 0, shared experts of layers 1, 2


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantize_load_equals_dequantized_source(tmp_path, method):
    out = tmp_path / "q"
    # AWQ without the clip search: its α search re-quantizes every group per candidate (minutes on this CPU)
    recipe = (Recipe("w4-awq", ((r".*", Rule(bits=4, group_size=128, method="awq", clip_search=False)),))
              if method == "awq" else BUILTIN_RECIPES["w4g128"].with_method(method))
    quantize(SRC, out, recipe, OPTS)
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert {f"model.layers.2.self_attn.{p}.weight_packed" for p in MLA} <= keys
    assert {"model.layers.1.mlp.experts.7.down_proj.weight_packed", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.0.self_attn.kv_a_layernorm.weight", "model.layers.0.self_attn.q_a_layernorm.weight"} <= keys
    assert not any(k.endswith("norm.weight_packed") for k in keys)  # norms are never quantized
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = [t[3:] for g in qc["config_groups"].values() for t in g["targets"]]
    packed = {k[: -len(".weight_packed")] for k in keys if k.endswith(".weight_packed")}
    assert all(any(re.match(t, p) for t in targets) for p in packed)

    q = quantkit.load(out)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == N_LINEAR
    assert sum(isinstance(m, QuantExperts) for m in q.modules()) == 2
    ref = dequantized_reference(q, SRC)
    # the unquantized tensors as written (AWQ folds its scales into the norms and the fp32 router)
    plain = {k: v for k, v in q.state_dict().items() if k in ref.state_dict()}
    assert any("kv_a_layernorm" in k for k in plain) and not any("kv_b_proj" in k for k in plain)
    ref.load_state_dict(plain, strict=False)
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (q(ids) - ref(ids)).abs().max().item() <= 1e-5
    gen = q.generate(ids[:1, :5], max_new_tokens=6, eos_token_id=[])
    assert gen.shape == (1, 11)
    r = evaluate_perplexity(str(out), "sotu:test", seq_len=64, max_windows=1, progress=False)
    assert r.windows == 1 and math.isfinite(r.perplexity) and r.perplexity > 1


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True, check=False)


def test_cli_quantize_eval_dry_run_inspect(tmp_path):
    out = tmp_path / "q"
    r = _cli("quantize", SRC, "-o", str(out), "--method", "gptq", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "modules quantized" in r.stdout and "self_attn.q_b_proj: group 128 does not divide K=32" in r.stdout
    assert not out.exists()
    r = _cli("quantize", SRC, "-o", str(out), "--method", "gptq", "--calib", "sotu:train", "--calib-samples", "4",
             "--calib-seq-len", "64")
    assert r.returncode == 0, r.stderr
    r = _cli("eval", "perplexity", str(out), "--data", "sotu:test", "--seq-len", "64", "--max-windows", "1",
             "--json", str(tmp_path / "ppl.json"))
    assert r.returncode == 0, r.stderr
    assert math.isfinite(json.loads((tmp_path / "ppl.json").read_text())["perplexity"])
    r = _cli("inspect", str(out))
    assert r.returncode == 0, r.stderr
    assert "self_attn.kv_b_proj: int4" in r.stdout and "self_attn.kv_a_layernorm (float32)" in r.stdout
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    q = quantkit.load(out)
    with torch.no_grad():
        want = q(ids)
        assert (want - hf(ids).logits).abs().max().item() <= 1e-4
        # the Triton backend (the interpreter on a CPU): routing, fused MoE, dequant GEMMs, norms, MLA's RoPE
        assert dispatch.set_backend(q, "triton") > 0
        assert (q(ids[:1, :8]) - want[:1, :8]).abs().max().item() <= 1e-4 * want.abs().max().item()


def _random_model(**changes) -> MoeForCausalLM:
    d = family_config("deepseek-v3-tiny", "float32") | changes
    model = MoeForCausalLM(MoeConfig.from_dict(d))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * noise if "norm" in name else 0.1 * noise)
    return model.eval()


def test_candidates_are_the_mla_linears_and_q_a_kv_a_share_a_rule():
    cfg = _random_model().config
    names = [n for n, _ in candidate_modules(cfg) if n.startswith("model.layers.0.self_attn.")]
    assert names == [f"model.layers.0.self_attn.{p}" for p in MLA]
    w4, w8 = Rule(bits=4, group_size=32), Rule(bits=8, group_size=32)
    split = Recipe("split", ((r"kv_a_proj_with_mqa", w8), (r".*", w4)))
    with pytest.raises(UsageError, match="q_a_proj, .*kv_a_proj_with_mqa are loaded fused"):
        make_plan(cfg, split)
    # without q_lora_rank vLLM loads q_proj and kv_a_proj_with_mqa apart: different rules are fine
    no_lora = _random_model(q_lora_rank=None).config
    plan = make_plan(no_lora, split)
    assert plan.entry("model.layers.0.self_attn.q_proj").rule.bits == 4
    assert plan.entry("model.layers.0.self_attn.kv_a_proj_with_mqa").rule.bits == 8


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_awq_mla_smoothing_keeps_the_fp_output(q_lora_rank):
    """Every MLA smoothing group folded at a forced α = 0.5 (s != 1): the fp layer computes the same outputs."""
    model = _random_model(q_lora_rank=q_lora_rank)
    cfg = model.config
    plan = make_plan(cfg, BUILTIN_RECIPES["w4g128"].with_method("awq"))
    h = torch.randn(2, 16, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    cos, sin = model.rope(0, 16, "cpu")
    for idx in (0, 1):  # dense, MoE
        layer = model.model.layers[idx]
        prefix = f"model.layers.{idx}."
        entries = {e.module[len(prefix):]: e for e in plan.entries if e.module.startswith(prefix)}
        with torch.no_grad():
            before = layer(h, cos, sin)
            norms = {n: p.clone() for n, p in layer.named_parameters() if "norm" in n}
            chosen = apply_awq(layer, capture_layer(layer, [h], cos, sin), entries, alphas=(0.5,))
            after = layer(h, cos, sin)
        lead = "q_a_proj" if q_lora_rank else "q_proj"
        want = {f"input_layernorm->{lead}+kv_a_proj_with_mqa", "kv_a_layernorm->kv_b_proj", "v->o"}
        want |= {"q_a_layernorm->q_b_proj"} if q_lora_rank else set()
        assert want <= set(chosen)
        changed = {n for n, p in layer.named_parameters() if n in norms and not torch.equal(p, norms[n])}
        assert {"input_layernorm.weight", "self_attn.kv_a_layernorm.weight"} <= changed
        assert ("self_attn.q_a_layernorm.weight" in changed) == bool(q_lora_rank)
        assert (after - before).abs().max().item() <= 1e-5 * before.abs().max().item()
