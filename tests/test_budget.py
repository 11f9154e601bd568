"""The trellis bit budget (``--bits-per-weight``): the sensitivity measure against the encoder, the allocation
against brute force, and the pipeline end to end on a small random ERNIE (L = 8: plumbing and layout)."""

import itertools
import json
import re
import subprocess
import sys

import pytest
import torch
from dequant_reference import dequantized_reference
from random_src import WIDE, write_src
from safetensors.torch import load_file, save_file

import quantkit
from quantkit.errors import UsageError
from quantkit.model.loader import Checkpoint
from quantkit.pipeline.budget import apply_budget
from quantkit.pipeline.quantize import CalibOptions, QuantizeOptions, quantize
from quantkit.quant.budget import Unit, allocate, predicted_loss
from quantkit.quant.config import Recipe, make_plan
from quantkit.quant.trellis import trellis

L = 8
EXPERTS = {"pattern": r"mlp\.experts\.", "format": "trellis", "bits": 2, "state_bits": L}
UNIT_WEIGHTS = {"gate_proj+up_proj": 2 * 8 * 64 * 128, "down_proj": 8 * 128 * 64}  # WIDE: 8 experts, [64, 128]
TOTAL = 2 * sum(UNIT_WEIGHTS.values())  # two MoE layers
LO = 2 + 16 * (64 + 128) / (64 * 128)  # all at 2 bits, fp16 suh/svh counted


def _recipe(method="rtn", budget=None, rest=False) -> Recipe:
    rules = [{**EXPERTS, "method": method}] + ([{"pattern": ".*", "bits": 4, "group_size": 128}] if rest else [])
    return Recipe.from_dict({"name": "t", "bits_per_weight": budget, "rules": rules})


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_src(tmp_path_factory, WIDE)


@pytest.fixture(scope="module")
def src_loud_down(tmp_path_factory):
    """The same model with layer 2's routed down projections scaled 8x: 64x the squared error at any K."""
    path = write_src(tmp_path_factory, WIDE)
    f = path / "model.safetensors"
    t = load_file(f)
    for k in t:
        if re.fullmatch(r"model\.layers\.2\.mlp\.experts\.\d+\.down_proj\.weight", k):
            t[k] = t[k] * 8
    save_file(t, f, metadata={"format": "pt"})
    return path


def test_predicted_loss_matches_the_encoders_proxy_loss():
    """E[tr(dW H dW^T)] predicted from W, H and the code's Gaussian MSE vs what the encoder leaves (float64)."""
    g = torch.Generator().manual_seed(0)
    E, N, K = 3, 32, 64
    W = torch.randn(E, N, K, generator=g) * torch.linspace(0.5, 2, K)
    X = (torch.randn(E, 512, K, generator=g) @ (torch.randn(K, K, generator=g) / 8 + 0.3 * torch.eye(K))) * torch.linspace(0.2, 3, K)
    H = X.transpose(1, 2) @ X
    for bits, h, feedback in ((2, H, True), (3, H, True), (2, None, False)):
        D = trellis(W, h, bits=bits, L=L).dequantize().double() - W.double()
        measured = ((D @ H.double()) * D).sum((-1, -2))
        ratio = measured / predicted_loss(W, H, bits, L, feedback=feedback)
        assert ((ratio > 0.8) & (ratio < 1.25)).all(), (bits, feedback, ratio)


def _units(n, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        w = sizes[i % len(sizes)]
        s = float(torch.rand(1, generator=g)) * 10
        out.append(Unit(f"u{i}", w, {k: w * (k + 0.375) / 8 for k in (2, 3, 4)}, {2: s, 3: s / 3.7, 4: s / 14}))
    return out


def _bpw(units, choice):
    return 8 * sum(u.bytes[choice[u.name]] for u in units) / sum(u.weights for u in units)


def test_allocate_equals_brute_force_for_equal_units():
    units = _units(5, [1024])
    for budget in (2.375, 2.6, 2.975, 3.4, 3.775, 4.375):
        best = min((sum(u.loss[k] for u, k in zip(units, ks)), ks) for ks in itertools.product((2, 3, 4), repeat=5)
                   if _bpw(units, {u.name: k for u, k in zip(units, ks)}) <= budget + 1e-12)
        got = allocate(units, budget)
        assert sum(u.loss[got[u.name]] for u in units) == pytest.approx(best[0])


def test_allocate_stays_under_the_budget_within_one_unit():
    units = _units(9, [1024, 2048, 512], seed=1)
    for budget in torch.linspace(2.375, 4.375, 23).tolist():
        got = allocate(units, budget)
        bpw = _bpw(units, got)
        assert bpw <= budget + 1e-12
        upgrades = [u.weights / sum(x.weights for x in units) for u in units if got[u.name] < 4]
        assert not upgrades or budget - bpw < min(upgrades)  # no upgrade left that would still fit
    assert len(set(allocate(units, 3.2).values())) > 1


def test_the_budget_follows_sensitivity(src_loud_down):
    """The loud unit gets 4 bits first; the rest stays at 2 until the budget allows more."""
    budget = LO + 2 * UNIT_WEIGHTS["down_proj"] / TOTAL + 0.01
    recipe, rep = apply_budget(Checkpoint(src_loud_down), _recipe(budget=budget), QuantizeOptions())
    bits = {u["unit"]: u["bits"] for u in rep["units"]}
    assert bits == {"model.layers.1.mlp.experts.gate_proj+up_proj": 2, "model.layers.1.mlp.experts.down_proj": 2,
                    "model.layers.2.mlp.experts.gate_proj+up_proj": 2, "model.layers.2.mlp.experts.down_proj": 4}
    assert rep["planned_bits_per_weight"] == pytest.approx(LO + 2 * UNIT_WEIGHTS["down_proj"] / TOTAL)
    assert rep["bounds"] == pytest.approx([LO, LO + 2])
    plan = make_plan(Checkpoint(src_loud_down).config, recipe)
    assert {e.module: e.rule.bits for e in plan.entries}["model.layers.2.mlp.experts.down_proj"] == 4
    assert plan.entry("model.layers.2.mlp.experts.up_proj").rule.label == "w2trellis-L8"


def test_bad_budgets_are_one_error(src):
    ck = Checkpoint(src)
    for b in (2.3, 4.5):
        with pytest.raises(UsageError, match=r"outside what the trellis code gives these routed experts: 2\.375 .* 4\.375"):
            apply_budget(ck, _recipe(budget=b), QuantizeOptions())
    code2 = Recipe.from_dict({"name": "c", "bits_per_weight": 2.5, "rules": [{"pattern": r"mlp\.experts\.", "format": "code2"}]})
    with pytest.raises(UsageError, match="puts no routed experts in the trellis code"):
        apply_budget(ck, code2, QuantizeOptions())
    with pytest.raises(UsageError, match="resolves against the model.s weights before planning"):
        make_plan(ck.config, _recipe(budget=3.0))
    for bad in (0, -1, "2.5", float("nan"), True):
        with pytest.raises(UsageError, match="bits_per_weight must be a positive number"):
            _recipe(budget=bad)
    assert Recipe.from_dict(_recipe(budget=2.5).to_dict()) == _recipe(budget=2.5)


def test_calibrated_budget_end_to_end(src, tmp_path):
    """LDLQ with a budget: the mix is within one unit of the budget, the checkpoint records K per module, loads,
    and its logits are those of the source with the dequantized weights."""
    calib = CalibOptions(data="sotu:train", samples=4, seq_len=64)
    rep = quantize(str(src), tmp_path / "q", _recipe("gptq", 3.0), QuantizeOptions(progress=False, calib=calib))
    b = rep["bit_budget"]
    assert b["sensitivity"].startswith("predicted calibration proxy loss") and len(b["units"]) == 4
    assert b["planned_bits_per_weight"] <= 3.0
    left = [u["weights"] / TOTAL for u in b["units"] if u["bits"] < 4]
    assert 3.0 - b["planned_bits_per_weight"] < min(left)
    parts = {k: v for k, v in rep["bits_per_weight_parts"].items() if "routed experts" in k}
    assert sum(v["bits_per_weight"] * v["weights"] for v in parts.values()) / TOTAL == pytest.approx(b["planned_bits_per_weight"])
    block = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quantkit_trellis"]["modules"]
    for u in b["units"]:
        stem, _, leaf = u["unit"].rpartition(".")
        for proj in leaf.split("+"):
            assert block[f"{stem}.{proj}"] == {"bits": u["bits"], "state_bits": L}
    q = quantkit.load(tmp_path / "q")
    ref = dequantized_reference(q, src)
    ids = torch.randint(0, 320, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (q(ids) - ref(ids)).abs().max().item() <= 1e-5


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "quantkit.cli", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_cli_dry_run_shows_k_per_tensor_and_refuses_bad_budgets(src, tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"name": "w2trellis-L8", "rules": [EXPERTS, {"pattern": ".*", "bits": 4}]}))
    p = _cli("quantize", str(src), "-o", str(tmp_path / "o"), "--recipe", str(f), "--bits-per-weight", "2.9", "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "bit budget: 2.9 bits/weight asked" in p.stdout and "w2trellis-L8@2.9bpw" in p.stdout
    layer_lines = [ln.strip() for ln in p.stdout.splitlines() if ln.strip().startswith("model.layers.")]
    assert len(layer_lines) == 2 and all(re.fullmatch(r"model\.layers\.\d\.mlp\.experts: gate\+up [234], down [234] bits", ln)
                                         for ln in layer_lines), layer_lines
    p = _cli("quantize", str(src), "-o", str(tmp_path / "o"), "--recipe", str(f), "--bits-per-weight", "2", "--dry-run")
    assert p.returncode == 2 and p.stderr.startswith("error: --bits-per-weight 2 is outside") and len(p.stderr.splitlines()) == 1
    p = _cli("quantize", str(src), "-o", str(tmp_path / "o"), "--bits", "4", "--bits-per-weight", "2.5")
    assert p.returncode == 2 and "does not combine with --bits" in p.stderr
