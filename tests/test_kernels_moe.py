"""Fused MoE (Triton): the alignment, the kernels against a float64 oracle and the torch twin (uneven routing,
experts with no tokens), and a whole quantized ``random:ernie-tiny`` with backend triton vs torch."""

import pytest
import torch
from kernel_cases import (DEV, TOL, gpu, oracle_moe, poison, random_int_weight, rel_err,  # noqa: F401
                          uneven_routing)

import quantkit
from quantkit.kernels import dense, dispatch, reference, routing
from quantkit.kernels import fused_moe as fm
from quantkit.kernels.dense import Config
from quantkit.nn.quantized import QuantExperts, QuantLinear

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("t, e, k, bm", [(1, 8, 2, 16), (2, 64, 6, 16), (3, 8, 2, 16), (16, 8, 3, 16), (33, 5, 2, 32),
                                         (40, 1, 1, 16), (7, 64, 6, 64), (300, 64, 6, 64), (50, 100, 4, 16)])
def test_align_groups_pairs_by_expert(t, e, k, bm, monkeypatch):
    monkeypatch.setattr(fm, "ALIGN_KERNEL_PAIRS", 4096)  # the kernel also for the large cases (many chunks)
    gen = torch.Generator().manual_seed(t * 100 + e)
    ids, _ = uneven_routing(t, e, k, gen)
    rows, block_expert = fm.align(ids, e, bm)
    p = t * k
    flat = ids.reshape(-1).cpu()
    if t <= fm.PAIR_BLOCK_TOKENS:  # decode: a block per pair, its expert read from the top-k ids (no launch)
        assert rows is None and torch.equal(block_expert.cpu(), flat)
        return
    rows, block_expert = rows.cpu().long(), block_expert.cpu().long()
    assert rows.numel() == block_expert.numel() * bm
    real = rows[rows < p]
    assert sorted(real.tolist()) == list(range(p))  # every pair exactly once
    assert bool((rows[rows >= p] == p).all())  # the rest is padding
    for b in range(block_expert.numel()):
        pairs = rows[b * bm:(b + 1) * bm]
        pairs = pairs[pairs < p]
        if block_expert[b] == e:  # past the end: no pairs
            assert pairs.numel() == 0
        else:
            assert bool((flat[pairs] == block_expert[b]).all())
    twin = reference.align(ids, e, bm, block_expert.numel())
    assert torch.equal(rows, twin[0].cpu().long()) and torch.equal(block_expert, twin[1].cpu().long())
    used = block_expert[block_expert < e]  # one run of blocks per expert that has pairs, none for the others
    assert sorted(set(used.tolist())) == sorted(set(flat.tolist()))
    assert bool((used[1:] >= used[:-1]).all())


def moe_weights(e, hdim, inter, bits, group, asym, gen, down_group=None):
    gate = random_int_weight((e,), inter, hdim, bits, group, asym, gen)
    up = random_int_weight((e,), inter, hdim, bits, group, asym, gen)
    down = random_int_weight((e,), hdim, inter, bits, down_group or group, asym, gen)
    return gate, up, down


# (T, E, top_k, H, I, bits, group (None: channel), down group, asym, dtype)
CASES = [
    (1, 8, 2, 128, 48, 4, 64, 16, False, BF16),
    (3, 8, 2, 64, 96, 4, 32, 32, True, FP16),
    (16, 6, 3, 128, 64, 2, 64, 32, True, BF16),
    (33, 8, 3, 64, 64, 8, 32, 64, True, BF16),
    (5, 1, 1, 64, 40, 4, None, None, True, FP32),
    (33, 4, 2, 96, 32, 4, 32, 32, False, FP32),
]


def check_moe(t, e, k, hdim, inter, bits, group, down_group, asym, dtype, seed, configs=None, with_add=False):
    """``with_add``: a second term (the shared experts' output in the model) summed in the kernels' combine."""
    gen = torch.Generator().manual_seed(seed)
    gate, up, down = moe_weights(e, hdim, inter, bits, group, asym, gen, down_group)
    x = torch.randn(t, hdim, generator=gen).to(DEV, dtype)
    ids, w = uneven_routing(t, e, k, gen)
    add = 0.05 * torch.randn(t, hdim, generator=gen).to(DEV, dtype) if with_add else None
    out = fm.fused_moe(x, ids, w, gate, up, down, configs, add=add)
    assert out.shape == (t, hdim) and out.dtype == dtype
    f64 = [wt.dequantize(torch.float64) for wt in (gate, up, down)]
    oracle = oracle_moe(x, ids, w, *f64) + (0 if add is None else add.double())
    assert rel_err(out, oracle) <= TOL[dtype]
    assert rel_err(out, reference.fused_moe(x, ids, w, gate, up, down, add).double()) <= 1.5 * TOL[dtype]


@pytest.mark.parametrize("seed, case", list(enumerate(CASES)), ids=lambda c: c if isinstance(c, int) else
                         f"t{c[0]}-e{c[1]}-k{c[2]}-w{c[5]}g{c[6]}-{'asym' if c[8] else 'sym'}-{str(c[9])[6:]}")
def test_fused_moe_matches_float64(seed, case):
    check_moe(*case, seed=100 + seed, with_add=seed % 2 == 0)


@pytest.mark.parametrize("configs", [
    (Config(32, 32, 32), Config(32, 64, 16)),                                        # K tiles under the group
    (Config(64, 64, 64, scale_in_tile=True), Config(64, 32, 32, scale_in_tile=True)),  # prefill variant
])
def test_fused_moe_explicit_configs(configs):
    check_moe(33, 8, 3, 128, 64, 4, 64, 32, True, BF16, seed=7, configs=configs)


def test_no_tokens():
    gen = torch.Generator().manual_seed(0)
    gate, up, down = moe_weights(4, 64, 32, 4, 32, False, gen)
    x = torch.randn(0, 64).to(DEV, BF16)
    ids = torch.zeros(0, 2, dtype=torch.long, device=DEV)
    assert fm.fused_moe(x, ids, torch.zeros(0, 2, device=DEV), gate, up, down).shape == (0, 64)


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    from quantkit.pipeline.quantize import QuantizeOptions, quantize
    from quantkit.quant.config import BUILTIN_RECIPES

    out = {}
    for recipe in ("w4g128-asym", "w2g64"):
        out[recipe] = tmp_path_factory.mktemp("q") / recipe
        quantize("random:ernie-tiny", out[recipe], BUILTIN_RECIPES[recipe], QuantizeOptions(progress=False))
    return out


@pytest.mark.parametrize("recipe, dtype", [("w4g128-asym", BF16), ("w2g64", FP32)])
def test_whole_model_triton_matches_torch(tiny_quantized, monkeypatch, recipe, dtype):
    calls = {"linear": 0, "gate_up": 0, "moe": 0, "route": 0}
    for mod, name, key in ((dense, "int_linear", "linear"), (dense, "gate_up", "gate_up"), (fm, "fused_moe", "moe"),
                           (routing, "route", "route")):
        real = getattr(mod, name)

        def counted(*a, _real=real, _key=key, **kw):
            calls[_key] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(mod, name, counted)
    ids = torch.randint(0, 320, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEV)
    torch_model = quantkit.load(tiny_quantized[recipe], device=DEV, dtype=dtype, backend="torch")
    triton_model = quantkit.load(tiny_quantized[recipe], device=DEV, dtype=dtype, backend="triton")
    assert {m.backend for m in triton_model.modules() if isinstance(m, (QuantLinear, QuantExperts))} == {"triton"}
    with torch.no_grad():
        ref = torch_model(ids).double()
        out = triton_model(ids)
    # attention (4 per layer); the dense MLP and the shared experts: gate+up in one launch, then down; 2 MoE
    # layers, each routed by the routing kernel
    assert calls == {"linear": 3 * 4 + 1 + 2, "gate_up": 3, "moe": 2, "route": 2}
    assert rel_err(out, ref) <= 2 * TOL[dtype]


def test_cli_refuses_triton_without_cuda(tiny_dir, monkeypatch):
    from click.testing import CliRunner

    from quantkit.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    r = CliRunner().invoke(main, ["generate", str(tiny_dir), "--prompt", "hi", "--backend", "triton"])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "needs a CUDA device" in r.output


# -- full shapes, GPU only ----------------------------------------------------------------------------

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4, 16, 64, 256, 2048])
def test_ernie_moe_layer_gpu(t):
    """ERNIE-4.5-21B-A3B: 64 experts, top-6, H 2560, I 1536, W4 g128 (sym and asym), bf16."""
    for asym in (False, True):
        gen = torch.Generator().manual_seed(t)
        gate, up, down = moe_weights(64, 2560, 1536, 4, 128, asym, gen)
        x = torch.randn(t, 2560, generator=gen).to(DEV, BF16)
        ids, w = uneven_routing(t, 64, 6, gen)
        out = fm.fused_moe(x, ids, w, gate, up, down)
        ref = reference.fused_moe(x.double(), ids, w, gate, up, down)
        assert rel_err(out, ref) <= TOL[BF16]
        assert dispatch.kernel_reads(gate)
