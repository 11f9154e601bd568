"""Calibration: reproducible windows, exact per-expert token counts and Hessians, reports."""

import subprocess
import sys

import pytest
import torch

import quantkit
from quantkit.calib.capture import capture_layer
from quantkit.calib.data import calibration_windows
from quantkit.errors import UsageError


def test_windows_are_seeded_and_split_across_sources(tiny_dir):
    tok = quantkit.load_tokenizer(tiny_dir)
    a = calibration_windows("sotu:train+peoples-daily:train", tok, 6, 32, seed=1)
    b = calibration_windows("sotu:train+peoples-daily:train", tok, 6, 32, seed=1)
    c = calibration_windows("sotu:train+peoples-daily:train", tok, 6, 32, seed=2)
    assert a.shape == (6, 32) and torch.equal(a, b) and not torch.equal(a, c)
    zh = tok.decode(a[3:].flatten().tolist())
    assert any("\u4e00" <= ch <= "\u9fff" for ch in zh)  # the second half is Chinese


def test_too_little_data_is_a_clear_error(tmp_path, tiny_dir):
    (tmp_path / "small.txt").write_text("tiny corpus " * 10)
    with pytest.raises(UsageError, match="fewer than the 50 asked for"):
        calibration_windows(str(tmp_path / "small.txt"), quantkit.load_tokenizer(tiny_dir), 50, 64)


def _moe_layer_input(model, ids):
    h = model.model.embed_tokens(ids)
    cos, sin = model.rope(0, ids.shape[1], "cpu")
    return model.model.layers[0](h, cos, sin), cos, sin


@pytest.mark.parametrize("mode", ["routed", "all"])
@pytest.mark.parametrize("prob_weighted", [False, True])
def test_capture_counts_and_hessians_exactly(tiny_dir, mode, prob_weighted):
    model = quantkit.load(tiny_dir)
    ids = torch.randint(0, 320, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h, cos, sin = _moe_layer_input(model, ids)
        layer = model.model.layers[1]
        cap = capture_layer(layer, [h[:2], h[2:]], cos, sin, expert_calibration=mode, prob_weighted=prob_weighted)
        # independent recomputation of the MoE block's input and routing
        a = h + layer.self_attn(layer.input_layernorm(h), cos, sin)
        x = layer.post_attention_layernorm(a).reshape(-1, 64)
        ids_k, w_k = layer.mlp.route(x)
        probs = torch.softmax(x @ layer.mlp.gate.weight.T, -1)
    assert cap.expert_tokens.tolist() == torch.bincount(ids_k.flatten(), minlength=8).tolist()
    assert int(cap.expert_tokens.sum()) == 3 * 40 * 2  # every token counted once per chosen expert
    for e in (0, 5):
        if mode == "all":
            rows, w = x, probs[:, e]
        else:
            tok, slot = torch.where(ids_k == e)
            rows, w = x[tok], w_k[tok, slot]
        weight = w if prob_weighted else torch.ones(len(rows))
        expected = (rows * weight[:, None]).T @ rows
        torch.testing.assert_close(cap.stats["mlp.experts.gate_proj"].H[e], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cap.stats["self_attn.q_proj"].H, layer.input_layernorm(h).reshape(-1, 64).T @
                               layer.input_layernorm(h).reshape(-1, 64), rtol=1e-4, atol=1e-4)


def test_report_pngs(tmp_path):
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", "random:ernie-tiny", "-o", str(out), "--method", "gptq",
                        "--calib", "sotu:train", "--calib-samples", "4", "--calib-seq-len", "64"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "report", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for name in ("expert_coverage.png", "layer_error.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import json

    rep = json.loads((out / "quantize_report.json").read_text())
    assert [len(l["expert_tokens"]) for l in rep["layers"] if l["moe"]] == [8, 8]
    assert all(sum(l["expert_tokens"]) == 4 * 64 * 2 for l in rep["layers"] if l["moe"])


def test_hidden_store_spills_beyond_budget_and_maps_exactly(tmp_path):
    from quantkit.calib.hidden import HiddenStore

    batches = [torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    store = HiddenStore(tmp_path / "h", budget_bytes=2 * batches[0].nbytes, device="cpu")
    for b in batches:
        store.append(b)
    assert store.spilled == 3 and len(list((tmp_path / "h").iterdir())) == 3
    nxt = store.map(lambda h: h * 2)
    assert [torch.equal(a, b * 2) for a, b in zip(nxt, batches)] == [True] * 5
    assert sorted(p.name for p in (tmp_path / "h").iterdir()) == ["g1-2.pt", "g1-3.pt", "g1-4.pt"]  # gen 0 removed
    info = nxt.persist()
    again = HiddenStore.reopen(tmp_path / "h", 0, "cpu", info)
    assert [torch.equal(a, b * 2) for a, b in zip(again, batches)] == [True] * 5


def test_spilled_run_equals_in_memory_run(tmp_path):
    from quantkit.pipeline.quantize import CalibOptions, QuantizeOptions, quantize
    from quantkit.quant.config import BUILTIN_RECIPES

    recipe = BUILTIN_RECIPES["w4g128"].with_method("gptq")
    outs = {}
    for name, budget in (("mem", 1 << 30), ("disk", 0)):
        opts = QuantizeOptions(progress=False, calib=CalibOptions(data="sotu:train", samples=4, seq_len=64, batch_size=1,
                                                                  memory_budget=budget))
        quantize("random:ernie-tiny", tmp_path / name, recipe, opts)
        outs[name] = (tmp_path / name / "model.safetensors").read_bytes()
    assert outs["mem"] == outs["disk"]


def test_fp_stream_cross_moments(tiny_dir):
    model = quantkit.load(tiny_dir)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        h, cos, sin = _moe_layer_input(model, ids)
        layer = model.model.layers[1]
        same = capture_layer(layer, [h], cos, sin, fp_hidden=[h.clone()])
        other = capture_layer(layer, [h], cos, sin, fp_hidden=[1.5 * h])
    for key in ("self_attn.q_proj", "self_attn.o_proj", "mlp.shared_experts.gate_proj"):
        torch.testing.assert_close(same.stats[key].M, same.stats[key].H)  # identical streams: M = H
        assert not torch.allclose(other.stats[key].M, other.stats[key].H)
        torch.testing.assert_close(other.stats[key].H, same.stats[key].H)  # H is the quantized stream's alone
    assert same.stats["mlp.experts.gate_proj"].M is None  # routed experts: no pairing
    assert int(same.expert_tokens.sum()) == 2 * 24 * model.config.moe_k  # the fp pass is not counted
