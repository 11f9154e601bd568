"""Each new family end to end: ``random:<family>-tiny`` (Hub layout) -> GPTQ w4 -> a checkpoint under the family's
Hub names (compressed-tensors targets included) -> ``quantkit.load`` (logits equal the source with dequantized
weights) -> perplexity. Mixtral, whose names differ most from the canonical ones, also goes through the CLI."""

import json
import math
import subprocess
import sys

import pytest
import torch
from dequant_reference import dequantized_reference
from safetensors import safe_open

import quantkit
from quantkit.evals.perplexity import evaluate_perplexity
from quantkit.nn.quantized import QuantExperts, QuantLinear
from quantkit.pipeline.quantize import CalibOptions, QuantizeOptions, quantize
from quantkit.quant.config import BUILTIN_RECIPES

OPTS = QuantizeOptions(progress=False, calib=CalibOptions(data="sotu:train", samples=4, seq_len=64))
# family source -> (a routed-expert tensor, a renamed or family-only tensor, the number of quantized 2-D linears)
EXPECT = {
    "qwen3-moe-tiny": ("model.layers.1.mlp.experts.7.down_proj.weight_packed", "model.layers.1.self_attn.q_norm.weight", 3 * 4 + 3),
    "qwen2-moe-tiny": ("model.layers.2.mlp.experts.0.gate_proj.weight_packed",
                       "model.layers.1.mlp.shared_expert.up_proj.weight_packed", 3 * 4 + 3 + 2 * 3),
    "mixtral-tiny": ("model.layers.0.block_sparse_moe.experts.7.w1.weight_packed", "model.layers.0.block_sparse_moe.gate.weight", 3 * 4),
    "olmoe-tiny": ("model.layers.2.mlp.experts.3.up_proj.weight_packed", "model.layers.0.self_attn.k_norm.weight", 3 * 4),
    "glm4-moe-tiny": ("model.layers.1.mlp.experts.5.up_proj.weight_packed",
                      "model.layers.1.mlp.gate.e_score_correction_bias", 3 * 4 + 3 + 2 * 3),
}


@pytest.fixture(scope="module")
def gptq_out(tmp_path_factory):
    """source -> its GPTQ w4g128 output, quantized once per module (every reader below reads the same files)."""
    done = {}

    def get(source):
        if source not in done:
            done[source] = tmp_path_factory.mktemp(source) / "q"
            quantize(f"random:{source}", done[source], BUILTIN_RECIPES["w4g128"].with_method("gptq"), OPTS)
        return done[source]
    return get


@pytest.mark.parametrize("source", sorted(EXPECT))
def test_family_gptq_quantize_load_and_perplexity(gptq_out, source):
    src, out = f"random:{source}", gptq_out(source)
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    expert, special, n_linear = EXPECT[source]
    assert expert in keys and special in keys
    assert not any(".experts." in k and k.endswith(".weight") for k in keys)  # every routed expert quantized
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    targets = [t[3:] for g in qc["config_groups"].values() for t in g["targets"]]
    packed = {k[: -len(".weight_packed")] for k in keys if k.endswith(".weight_packed")}
    assert all(any(__import__("re").match(t, p) for t in targets) for p in packed)  # targets name the Hub linears

    q = quantkit.load(out)
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == n_linear
    assert sum(isinstance(m, QuantExperts) for m in q.modules()) == len(q.config.moe_layers)
    ref = dequantized_reference(q, src)
    ids = torch.randint(0, 320, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (q(ids) - ref(ids)).abs().max().item() <= 1e-5
    r = evaluate_perplexity(str(out), "sotu:test", seq_len=64, max_windows=2, progress=False)
    assert r.windows == 2 and math.isfinite(r.perplexity) and r.perplexity > 1


def test_mixtral_through_the_cli(tmp_path):
    out = tmp_path / "q"

    def run(*args):
        return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True, check=False)

    r = run("quantize", "random:mixtral-tiny", "-o", str(out), "--method", "gptq", "--calib", "sotu:train",
            "--calib-samples", "4", "--calib-seq-len", "64")
    assert r.returncode == 0, r.stderr
    r = run("eval", "perplexity", str(out), "--data", "sotu:test", "--seq-len", "64", "--max-windows", "2",
            "--json", str(tmp_path / "ppl.json"))
    assert r.returncode == 0, r.stderr
    assert math.isfinite(json.loads((tmp_path / "ppl.json").read_text())["perplexity"])


@pytest.mark.parametrize("source", ["qwen3-moe-tiny", "glm4-moe-tiny"])
def test_triton_backend_matches_torch(source):
    """The Triton backend (interpreter off-GPU) on families with rotate-half / partial RoPE, softmax and sigmoid-group
    routers (the kernels' variants) and q/k norms (the RMSNorm kernel)."""
    src = f"random:{source}"
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = quantkit.load(src, backend="torch")(ids)
        model = quantkit.load(src, backend="triton")
        assert model.model.layers[1].self_attn.q_norm.backend == "triton"
        got = model(ids)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("source", [*sorted(EXPECT), "deepseek-v3-tiny"])  # MLA: fused_qkv_a_proj, kv_b_proj
def test_vllm_rules_accept_the_gptq_output(gptq_out, source):
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "check", str(gptq_out(source)), "--server", "vllm"],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("source", sorted(EXPECT))
def test_transformers_reads_the_gptq_output_with_our_logits(gptq_out, source):
    """The writer's Hub names and compressed-tensors targets, read by transformers' own loader (its per-family
    weight converters and ``CompressedTensorsHfQuantizer``): the same logits as quantkit's."""
    from transformers import AutoModelForCausalLM

    out = gptq_out(source)
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ref(ids).logits - quantkit.load(out)(ids)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", ["mixtral", "glm4_moe"])
def test_the_2bit_code_on_a_new_family_where_shapes_allow(tmp_path, family):
    """w2code (routed experts in the 2-bit code, the rest w4g128) on transformers-built Mixtral / GLM-4.5 models whose
    expert K is a multiple of 64 (the code's unit): loads, equals the dequantized source, only quantkit serves it."""
    from hf_families import make_family_model

    from quantkit.nn.code2 import Code2Stack
    from quantkit.quant.config import get_recipe
    from quantkit.serving import CheckpointView, check

    width = {"mixtral": {"intermediate_size": 64}, "glm4_moe": {"moe_intermediate_size": 64}}[family]
    make_family_model(family, hidden_size=64, **width).save_pretrained(tmp_path / "src")
    quantize(str(tmp_path / "src"), tmp_path / "q", get_recipe("w2code"), QuantizeOptions(progress=False))
    q = quantkit.load(tmp_path / "q")
    assert sum(isinstance(m, Code2Stack) for m in q.modules()) == 3 * len(q.config.moe_layers)
    ref = dequantized_reference(q, tmp_path / "src")
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (q(ids) - ref(ids)).abs().max().item() <= 1e-5
    view = CheckpointView.from_dir(tmp_path / "q")
    assert check(view, "quantkit") == [] and check(view, "vllm")


@pytest.mark.parametrize("source", ["qwen2-moe-tiny", "mixtral-tiny", "glm4-moe-tiny"])
def test_dry_run_resume_coverage_and_inspect_per_family(tmp_path, monkeypatch, source):
    """--dry-run (the plan under Hub names, every server's verdict), a run that dies on its last layer resumed to the
    bytes of an uninterrupted run, the coverage report (every routed expert's token count), and inspect."""
    import quantkit.pipeline.quantize as pipeline

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True, check=False)

    src = f"random:{source}"
    r = cli("quantize", src, "-o", str(tmp_path / "dry"), "--method", "gptq", "--dry-run")
    assert r.returncode == 0 and "vllm" in r.stdout and not (tmp_path / "dry").exists(), r.stdout + r.stderr

    recipe = BUILTIN_RECIPES["w4g128"].with_method("gptq")
    quantize(src, tmp_path / "ref", recipe, OPTS)
    real, last = pipeline.quantize_layer, f"model.layers.{quantkit.load(src).config.num_hidden_layers - 1}"

    def dies_on_last(layer, prefix, *a, **k):
        if prefix == last:
            raise MemoryError("simulated")
        return real(layer, prefix, *a, **k)

    monkeypatch.setattr(pipeline, "quantize_layer", dies_on_last)
    with pytest.raises(MemoryError):
        quantize(src, tmp_path / "out", recipe, OPTS)
    monkeypatch.setattr(pipeline, "quantize_layer", real)
    quantize(src, tmp_path / "out", recipe, OPTS, resume_run=True)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name

    rep = json.loads((tmp_path / "out" / "quantize_report.json").read_text())
    cfg = quantkit.load(src).config
    moe = [entry for entry in rep["layers"] if entry["moe"]]
    assert len(moe) == len(cfg.moe_layers)
    assert all(len(entry["expert_tokens"]) == cfg.moe_num_experts and
               sum(entry["expert_tokens"]) == OPTS.calib.samples * OPTS.calib.seq_len * cfg.moe_k for entry in moe)
    r = cli("inspect", str(tmp_path / "out"))
    assert r.returncode == 0 and cfg.spec.architectures[0] in r.stdout, r.stdout + r.stderr
