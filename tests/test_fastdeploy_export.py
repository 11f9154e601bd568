"""``quantize --export fastdeploy``: the layout FastDeploy's wint2 loader reads (quantkit/format/fastdeploy.py).

Each expected name, dtype, shape and config key below is written out by hand from the upstream FastDeploy
(PaddlePaddle/FastDeploy, develop) function cited beside it, not taken from quantkit's own tables. Loading
in FastDeploy itself is not verified here (it needs Paddle and a GPU).
"""

import json
import re
import subprocess
import sys

import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError, UsageError
from quantkit.format import fastdeploy as fd
from quantkit.format import paddle_layouts as pl
from quantkit.format import wint2
from quantkit.model.safetensors_io import CheckpointReader
from quantkit.pipeline.quantize import QuantizeOptions, quantize
from quantkit.quant.config import CODE2, W4, Rule, get_recipe, layer_range_recipe
from quantkit.sources.random_models import write_random_checkpoint
from random_src import WIDE, write_src

# expert K (hidden 128, moe_intermediate 128) a multiple of 128: FastDeploy keeps K // 128 local-scale rows
DIMS = dict(WIDE, moe_intermediate_size=128)
H, E, I, NQ, NKV, D = 128, 8, 128, 4, 2, 32


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_src(tmp_path_factory, DIMS)


@pytest.fixture(scope="module")
def outs(src, tmp_path_factory):
    base = tmp_path_factory.mktemp("fd")
    return {e: (base / e, quantize(str(src), base / e, get_recipe("w2code"), QuantizeOptions(progress=False, export=e)))
            for e in ("quantkit", "fastdeploy")}


def fd_config(outs):
    return json.loads((outs["fastdeploy"][0] / "config.json").read_text())


def test_config_is_paddle_format(outs):
    cfg = fd_config(outs)
    # fastdeploy/config.py::ModelConfig.read_model_config: "dtype" -> paddle; "torch_dtype" -> torch; both raise
    assert cfg["dtype"] == "bfloat16" and "torch_dtype" not in cfg
    # layers/moe/moe.py::FusedMoE.init_moe_weights: the routing bias exists only with moe_use_aux_free
    assert cfg["moe_use_aux_free"] is True
    assert cfg["architectures"] == ["Ernie4_5_MoeForCausalLM"]  # models/ernie4_5_moe.py::Ernie4_5_MoeForCausalLM.name


def test_quantization_config_keys_and_layer_dispatch(outs):
    qc = fd_config(outs)["quantization_config"]
    # layers/quantization/__init__.py::parse_quant_config: the method is the key "quantization"
    assert qc["quantization"] == "wint2" and qc["is_quantized"] is True
    assert "quant_method" not in qc and "config_groups" not in qc  # nothing compressed-tensors
    # layers/quantization/wint2.py::WINT2Config.from_config: dense_quant_type (default wint8), moe_quant_config
    assert qc["dense_quant_type"] == "wint8"
    moe = qc["moe_quant_config"]
    assert moe["quant_type"] == "w4w2" and moe["moe_w4_quant_config"]["quant_type"] == "wint4"
    assert moe["moe_w2_quant_config"]["quant_type"] == "wint2"
    # wint2.py::get_quant_method: a FusedMoE with layer_idx <= moe_w4_quant_end_layer is wint4, later ones wint2;
    # the export codes every MoE layer (1 and 2), so FastDeploy must pick wint2 for exactly those
    end = moe["moe_w4_quant_config"]["quant_end_layer"]
    moe_layers = range(DIMS["moe_layer_start_index"], DIMS["num_hidden_layers"])
    assert [i for i in moe_layers if not i <= end] == [1, 2]
    assert (moe["moe_w2_quant_config"]["quant_start_layer"], moe["moe_w2_quant_config"]["quant_end_layer"]) == (1, 2)


def test_tensor_names_dtypes_shapes(outs):
    rd = CheckpointReader(outs["fastdeploy"][0])
    got = {n: (rd.info(n).dtype, list(rd.info(n).shape)) for n in rd.names()}
    i8, u8, bf, f32 = torch.int8, torch.uint8, torch.bfloat16, torch.float32
    want = {
        # models/ernie4_5_moe.py::Ernie4_5_Model.__init__: prefix_name "ernie"
        "ernie.embed_tokens.weight": (bf, [320, H]), "ernie.norm.weight": (bf, [H]),
        # layers/linear.py::QKVParallelLinear: output (heads + 2 kv heads) * head_dim; weight_only.py::
        # WeightOnlyLinearMethod.create_weights: int8 weight_shape reversed [N, K], weight_scale [N] in the model dtype
        "ernie.layers.0.self_attn.qkv_proj.quant_weight": (i8, [(NQ + 2 * NKV) * D, H]),
        "ernie.layers.0.self_attn.qkv_proj.weight_scale": (bf, [(NQ + 2 * NKV) * D]),
        "ernie.layers.0.self_attn.o_proj.quant_weight": (i8, [H, NQ * D]),
        # layers/linear.py::MergedColumnParallelLinear (up_gate_proj, output 2 * intermediate)
        "ernie.layers.0.mlp.up_gate_proj.quant_weight": (i8, [2 * 256, H]),
        "ernie.layers.0.mlp.down_proj.weight_scale": (bf, [H]),
        # models/ernie4_5_moe.py::Ernie4_5_MoE.__init__: gate = ReplicatedLinear(H -> E, fp32), Paddle [in, out]
        "ernie.layers.1.mlp.gate.weight": (f32, [H, E]),
        "ernie.layers.1.mlp.moe_statics.e_score_correction_bias": (f32, [1, E]),  # moe.py::init_moe_weights
        "ernie.layers.2.mlp.shared_experts.up_gate_proj.quant_weight": (i8, [2 * I, H]),
        # layers/moe/fused_moe_wint2_backend.py::Wint2MoeMethod.create_weights
        "ernie.layers.1.mlp.experts.3.up_gate_proj.quant_weight": (u8, [H // 4, 2 * I]),
        "ernie.layers.1.mlp.experts.3.up_gate_proj.weight_scale": (u8, [H // 128, 2 * I]),
        "ernie.layers.1.mlp.experts.3.up_gate_proj.super_scales": (bf, [2 * I]),
        "ernie.layers.1.mlp.experts.3.up_gate_proj.code_scale": (f32, [2 * I]),
        "ernie.layers.1.mlp.experts.3.up_gate_proj.code_zp": (f32, [2 * I]),
        "ernie.layers.2.mlp.experts.7.down_proj.quant_weight": (u8, [I // 4, H]),
        "ernie.layers.2.mlp.experts.7.down_proj.weight_scale": (u8, [I // 128, H]),
        "ernie.layers.2.mlp.experts.7.down_proj.super_scales": (bf, [H]),
    }
    for name, spec in want.items():
        assert got.get(name) == spec, name
    assert not [n for n in got if n.startswith("model.")]  # utils.py::v1_loader_support: wint2 -> v0 loader, no rename
    unfused = re.compile(r"\.(q_proj|k_proj|v_proj|gate_proj|up_proj)\.")
    assert not [n for n in got if unfused.search(n)]  # linear.py: prequantized weights are popped by the fused name
    assert "lm_head.weight" not in got  # tied: ernie4_5_moe.py::set_state_dict copies the embedding


def test_router_is_the_source_gate_transposed(src, outs):
    s, f = CheckpointReader(src), CheckpointReader(outs["fastdeploy"][0])
    assert torch.equal(f.read("ernie.layers.2.mlp.gate.weight"), s.read("model.layers.2.mlp.gate.weight").t())


def test_coded_experts_are_quantkits_own_with_gate_and_up_fused(outs):
    """gate first in up_gate_proj (linear.py::MergedColumnParallelLinear shard offsets gate 0, up at half;
    moe.py::FusedMoE.load_experts_weight concatenates [gate, up]); the codes are quantkit's own, bit for bit."""
    own, exp = CheckpointReader(outs["quantkit"][0]), CheckpointReader(outs["fastdeploy"][0])
    for e in (0, 5):
        q, f = f"model.layers.2.mlp.experts.{e}", f"ernie.layers.2.mlp.experts.{e}"
        leaves = lambda rd, p: [rd.read(f"{p}.{leaf}") for leaf in wint2.LEAVES]  # noqa: E731
        gate, up, down = leaves(own, f"{q}.gate_proj"), leaves(own, f"{q}.up_proj"), leaves(own, f"{q}.down_proj")
        fused = leaves(exp, f"{f}.up_gate_proj")
        assert torch.equal(wint2.decode(*fused), torch.cat([wint2.decode(*gate), wint2.decode(*up)], dim=-1))
        assert torch.equal(wint2.decode(*leaves(exp, f"{f}.down_proj")), wint2.decode(*down))
        for a, g, u in zip(fused, gate, up):
            assert torch.equal(a, torch.cat([g, u], dim=-1))


def test_dense_wint8_dequantizes_to_the_source(src, outs):
    s, f = CheckpointReader(src), CheckpointReader(outs["fastdeploy"][0])
    w = torch.cat([s.read(f"model.layers.1.self_attn.{p}_proj.weight") for p in "qkv"])  # q, k, v along N
    stored = f.read("ernie.layers.1.self_attn.qkv_proj.quant_weight")
    codes = pl.wint8_codes(stored)
    deq = codes.float() * f.read("ernie.layers.1.self_attn.qkv_proj.weight_scale").float()[:, None]
    assert ((deq - w).norm() / w.norm()).item() < 0.01
    assert not torch.equal(stored.view(torch.uint8), (codes.to(torch.int16) + 128).to(torch.uint8))  # permuted


def test_wint8_layout_positions():
    """Positions from Paddle's weight_permute_kernel_wint8 (paddle/phi/kernels/impl/weight_quantize_kernel_gpu_impl.h),
    worked by hand: input k of a 16-block goes to 2*(k%8) + k//8, rows 2j/2j+1 alternate 64-input chunks
    inside 2K bytes, bytes are q + 128."""
    n, k = 4, 128
    cases = {(0, 0): 0, (0, 1): 2, (0, 7): 14, (0, 8): 1, (0, 15): 15, (0, 17): 18, (1, 0): 64, (1, 8): 65,
             (0, 64): 128, (1, 64): 192, (2, 0): 256, (3, 65): 450}
    for (r, c), pos in cases.items():
        codes = torch.zeros(n, k, dtype=torch.int8)
        codes[r, c] = -128
        flat = pl.wint8_layout(codes).view(torch.uint8).reshape(-1)
        assert flat[pos] == 0 and int((flat != 128).sum()) == 1, (r, c)
    x = torch.randint(-128, 128, (6, 192), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pl.wint8_codes(pl.wint8_layout(x)), x)
    with pytest.raises(ValueError, match="K % 64"):
        pl.wint8_layout(torch.zeros(2, 96, dtype=torch.int8))


def test_wint4_layout_positions():
    """Positions from Paddle's per_channel_quant_gpu_int4_col_pack (inputs 2j, 2j+1 in the low, high nibble of
    byte j), weight_permute_kernel_wint4 (byte j of a 16-byte block to 4*(j%4) + 2*((j%8)//4) + (j%16)//8,
    32-byte chunks of 4 rows interleaved in 2K bytes) and weight_interval_kernel_wint4 (in every 4 bytes the
    nibbles regrouped lo0|lo2, lo1|lo3, hi0|hi2, hi1|hi3, each + 8), worked by hand; nibble index = 2*byte + hi."""
    cases = {(4, 64, 0, 0): 0, (4, 64, 0, 1): 4, (4, 64, 0, 2): 8, (4, 64, 0, 8): 1, (4, 64, 0, 16): 2,
             (4, 64, 1, 0): 64, (4, 128, 0, 64): 256, (8, 128, 4, 0): 512}
    for (n, k, r, c), pos in cases.items():
        codes = torch.zeros(n, k, dtype=torch.int8)
        codes[r, c] = -8
        b = pl.wint4_layout(codes).view(torch.uint8).reshape(-1)
        nibbles = torch.stack([b & 0xF, b >> 4], 1).reshape(-1)
        assert b.numel() == n * k // 2 and nibbles[pos] == 0 and int((nibbles != 8).sum()) == 1, (r, c)
    x = torch.randint(-8, 8, (8, 192), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pl.wint4_codes(pl.wint4_layout(x)), x)


def test_w4_experts_then_the_code(src, tmp_path):
    """w4 experts in MoE layer 1, the code in layer 2: FastDeploy's wint4 for layer 1 (layer_idx <= end 1)."""
    out = tmp_path / "w4w2"
    rep = quantize(str(src), out, layer_range_recipe("w4w2", [(1, 1, W4), (2, 2, CODE2)]),
                   QuantizeOptions(progress=False, export="fastdeploy"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]["moe_quant_config"]
    assert qc["moe_w4_quant_config"]["quant_end_layer"] == 1 and qc["moe_w2_quant_config"]["quant_start_layer"] == 2
    f, s = CheckpointReader(out), CheckpointReader(src)
    # fused_moe_cutlass_backend.py::CutlassWeightOnlyMoEMethod.create_weights (weight_only_int4): up_gate
    # [moe_intermediate_size, hidden], down [hidden // 2, moe_intermediate_size], scales [2I] / [H]
    p = "ernie.layers.1.mlp.experts.5"
    shapes = {n: (f.info(n).dtype, list(f.info(n).shape)) for n in f.names() if n.startswith(p + ".")}
    assert shapes == {f"{p}.up_gate_proj.quant_weight": (torch.int8, [I, H]), f"{p}.up_gate_proj.weight_scale": (torch.bfloat16, [2 * I]),
                      f"{p}.down_proj.quant_weight": (torch.int8, [H // 2, I]), f"{p}.down_proj.weight_scale": (torch.bfloat16, [H])}
    w = torch.cat([s.read(f"model.layers.1.mlp.experts.5.{x}_proj.weight") for x in ("gate", "up")])
    deq = pl.wint4_codes(f.read(f"{p}.up_gate_proj.quant_weight")).float() * f.read(f"{p}.up_gate_proj.weight_scale").float()[:, None]
    assert ((deq - w).norm() / w.norm()).item() < 0.2  # 4-bit per channel on Gaussian weights
    assert "ernie.layers.2.mlp.experts.5.up_gate_proj.super_scales" in f.names()
    notes = {r["module"].split(".")[2] + ":" + r["note"] for r in rep["fallbacks"] if ".experts." in r["module"]}
    assert notes == {"1:--export fastdeploy: wint4 per-channel (FastDeploy's moe_w4_quant_config) instead of w4g128-sym"}


def test_dense_rule_is_replaced_and_said(outs):
    notes = {r["note"] for r in outs["fastdeploy"][1]["fallbacks"]}
    assert notes == {"--export fastdeploy: wint8 per-channel (FastDeploy's dense_quant_type) instead of w4g128-sym"}
    assert set(outs["fastdeploy"][1]["bits_per_weight_parts"]) == {"w2code (routed experts)", "w8ch-sym"}


def test_replaced_rules_keep_the_method():
    from quantkit.model.config import ErnieMoeConfig
    from quantkit.sources.random_models import hf_config

    cfg = ErnieMoeConfig.from_dict(hf_config(DIMS, "float32"))
    p = fd.plan(cfg, get_recipe("w2code").with_method("gptq"))
    assert {(e.rule.label, e.rule.method) for e in p.entries} == {("w2code", "gptq"), ("w8ch-sym", "gptq")}
    w4 = layer_range_recipe("w4w2", [(1, 1, W4), (2, 2, CODE2)], rest=Rule(bits=8, group_size=None, method="awq"))
    p = fd.plan(cfg, w4)  # awq+w8ch dense is already per-channel w8: kept; w4g128 experts become w4ch
    rules = {(e.module.split(".")[2], e.is_experts, e.rule.label, e.rule.method, bool(e.note)) for e in p.entries}
    assert ("1", True, "w4ch-sym", "rtn", True) in rules and ("0", False, "w8ch-sym", "awq", False) in rules


INEXPRESSIBLE = {
    "w2code-w4edges": get_recipe("w2code-w4edges"),  # w2 in the middle MoE layers only
    "w2g64-experts": get_recipe("w2g64-experts"),  # int2 experts
    "w4g128": get_recipe("w4g128"),  # no 2-bit code at all
    "w2-not-to-last": layer_range_recipe("mid", [(1, 1, CODE2)], rest=W4),
    "w2-then-w4": layer_range_recipe("w2w4", [(1, 1, CODE2), (2, 2, W4)], rest=W4),
    "int3-experts": layer_range_recipe("i3", [(1, 2, Rule(bits=3, group_size=128, symmetric=False))]),
}


@pytest.mark.parametrize("name", sorted(INEXPRESSIBLE))
def test_inexpressible_recipes_are_refused_before_any_work(src, tmp_path, name, monkeypatch):
    import quantkit.pipeline.quantize as q

    monkeypatch.setattr(q, "stream_layers", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "o"
    with pytest.raises(UsageError, match="nearest expressible: w2code") as e:
        quantize(str(src), out, INEXPRESSIBLE[name], QuantizeOptions(progress=False, export="fastdeploy"))
    assert "\n" not in str(e.value) and not out.exists() and not list(tmp_path.iterdir())


def test_model_fastdeploy_cannot_hold_is_refused(tmp_path):
    small = tmp_path / "k64"
    small.mkdir()
    write_random_checkpoint(small, dict(DIMS, moe_intermediate_size=64), seed=0, dtype="float32", max_shard_bytes=1 << 30)
    with pytest.raises(UsageError, match="moe_intermediate_size=64 is not a multiple of 128"):
        quantize(str(small), tmp_path / "o", get_recipe("w2code"), QuantizeOptions(progress=False, export="fastdeploy"))


def test_cli_refusal_is_one_line_and_dry_run_plans_the_layout(src, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", str(src), "-o", str(tmp_path / "z"),  # noqa: E731
                                     "--export", "fastdeploy", "--dry-run", *a], capture_output=True, text=True, timeout=300)
    r = run("--recipe", "w2code-w4edges")
    assert r.returncode == 2 and "nearest expressible: w2code" in r.stderr and "Traceback" not in r.stderr
    r = run("--recipe", "w2code")
    assert r.returncode == 0, r.stderr
    assert "w8ch-sym" in r.stdout and "w2code" in r.stdout


def test_quantkit_load_says_no_clearly(outs):
    with pytest.raises(QuantkitError, match=r"FastDeploy wint2 export .*quantize with --export quantkit"):
        quantkit.load(outs["fastdeploy"][0])

