"""2-bit-code (WINT2) dequant-GEMM and fused MoE (Triton) against a float64 oracle written from DESIGN.md's
decoding formula, and against the torch twin built on ``quantkit.format.wint2.decode`` (issue 5)."""

import pytest
import torch
from kernel_cases import (DEV, TOL, code2_oracle, gpu, oracle_moe, poison, random_code2_weight,  # noqa: F401
                          random_int_weight, rel_err, uneven_routing)

from quantkit.format import wint2
from quantkit.kernels import fused_moe as fm
from quantkit.kernels import dense, reference
from quantkit.kernels.code2 import code2_linear
from quantkit.kernels.dense import Config
from quantkit.kernels.reference import Code2Weight

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

CASES = [(1, 72, 192, BF16), (3, 40, 64, FP16), (16, 130, 320, BF16), (33, 24, 128, FP32), (33, 72, 256, BF16)]


def check(m, n, k, dtype, seed, config=None):
    gen = torch.Generator().manual_seed(seed)
    w = random_code2_weight((), n, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    out = code2_linear(x, w, config=config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, x.double() @ code2_oracle(w).t()) <= TOL[dtype]


@pytest.mark.parametrize("seed, case", list(enumerate(CASES)), ids=lambda c: c if isinstance(c, int) else
                         f"m{c[0]}-n{c[1]}-k{c[2]}-{str(c[3])[6:]}")
def test_code2_linear_matches_float64(seed, case):
    check(*case, seed=seed)


@pytest.mark.parametrize("config", [Config(16, 16, 64, split_k=3), Config(32, 32, 64, scale_in_tile=True)])
def test_code2_explicit_configs(config):
    check(33, 72, 320, BF16, seed=5, config=config)


@pytest.mark.parametrize("m, config", [(1, None), (33, Config(16, 32, 64, split_k=2))])
def test_code2_gate_up_matches_float64(m, config):
    """gate and up halves of FastDeploy's fused up_gate_proj as two strided views, in one launch."""
    gen = torch.Generator().manual_seed(m)
    fused = random_code2_weight((), 2 * 40, 128, gen)
    gate, up = (Code2Weight(*(t[..., cols] for t in (fused.quant_weight, fused.weight_scale, fused.super_scales,
                                                      fused.code_scale, fused.code_zp)))
                for cols in (slice(0, 40), slice(40, 80)))
    x = torch.randn(m, 128, generator=gen).to(DEV, BF16)
    dq = code2_oracle(fused)
    a = x.double() @ dq[:40].t()
    assert rel_err(dense.gate_up(x, gate, up, config), a * torch.sigmoid(a) * (x.double() @ dq[40:].t())) <= TOL[BF16]


def test_column_slice_of_a_fused_up_gate():
    """FastDeploy fuses gate|up along N; the kernel takes either half as a strided view, no copy."""
    gen = torch.Generator().manual_seed(6)
    fused = random_code2_weight((), 2 * 40, 128, gen)
    up = Code2Weight(*(t[..., 40:] for t in (fused.quant_weight, fused.weight_scale, fused.super_scales,
                                              fused.code_scale, fused.code_zp)))
    assert not up.quant_weight.is_contiguous()
    x = torch.randn(3, 128, generator=gen).to(DEV, BF16)
    ref = x.double() @ code2_oracle(fused)[40:].t()
    assert rel_err(code2_linear(x, up), ref) <= TOL[BF16]


def test_k_must_be_a_multiple_of_64():
    gen = torch.Generator().manual_seed(0)
    w = random_code2_weight((), 8, 128, gen)
    short = Code2Weight(w.quant_weight[:24], w.weight_scale, w.super_scales, w.code_scale, w.code_zp)  # K = 96
    with pytest.raises(ValueError, match="multiple of 64"):
        code2_linear(torch.zeros(1, 96, device=DEV), short)


def test_oracle_is_the_issue5_decoder():
    gen = torch.Generator().manual_seed(1)
    for k in (64, 192, 256):
        w = random_code2_weight((2,), 24, k, gen)
        dec = wint2.decode(w.quant_weight, w.weight_scale, w.super_scales, w.code_scale, w.code_zp)
        assert torch.equal(dec.transpose(-1, -2).double(), code2_oracle(w))  # exact: every step is exact in fp32


def test_twin_matches_kernel():
    gen = torch.Generator().manual_seed(2)
    w = random_code2_weight((), 72, 192, gen)
    x = torch.randn(5, 192, generator=gen).to(DEV, BF16)
    assert rel_err(code2_linear(x, w), reference.code2_linear(x, w).double()) <= TOL[BF16]


def code2_experts(e, hdim, inter, gen):
    return (random_code2_weight((e,), inter, hdim, gen), random_code2_weight((e,), inter, hdim, gen),
            random_code2_weight((e,), hdim, inter, gen))


@pytest.mark.parametrize("t, e, k, dtype", [(1, 8, 2, BF16), (16, 6, 3, FP16), (33, 8, 3, BF16), (5, 3, 1, FP32)])
def test_fused_moe_code2_matches_float64(t, e, k, dtype):
    gen = torch.Generator().manual_seed(t + e)
    gate, up, down = code2_experts(e, 128, 64, gen)
    x = torch.randn(t, 128, generator=gen).to(DEV, dtype)
    ids, w = uneven_routing(t, e, k, gen)
    out = fm.fused_moe(x, ids, w, gate, up, down)
    assert rel_err(out, oracle_moe(x, ids, w, *(code2_oracle(p) for p in (gate, up, down)))) <= TOL[dtype]


def test_fused_moe_code2_gate_up_with_int4_down():
    gen = torch.Generator().manual_seed(9)
    gate, up, _ = code2_experts(4, 128, 64, gen)
    down = random_int_weight((4,), 128, 64, 4, 32, True, gen)
    x = torch.randn(7, 128, generator=gen).to(DEV, BF16)
    ids, w = uneven_routing(7, 4, 2, gen)
    out = fm.fused_moe(x, ids, w, gate, up, down)
    ref = oracle_moe(x, ids, w, code2_oracle(gate), code2_oracle(up), down.dequantize(torch.float64))
    assert rel_err(out, ref) <= TOL[BF16]


def test_fused_moe_code2_twin():
    gen = torch.Generator().manual_seed(3)
    gate, up, down = code2_experts(4, 64, 64, gen)
    x = torch.randn(6, 64, generator=gen).to(DEV, BF16)
    ids, w = uneven_routing(6, 4, 2, gen)
    ref = reference.fused_moe(x, ids, w, gate, up, down).double()
    assert rel_err(fm.fused_moe(x, ids, w, gate, up, down), ref) <= 1.5 * TOL[BF16]


# -- full shapes, GPU only ----------------------------------------------------------------------------

@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 256, 2048])
def test_full_shapes_gpu(m):
    for i, (n, k) in enumerate([(3072, 2560), (2560, 1536), (2560, 2560)]):
        check(m, n, k, BF16, seed=m + i)
    gen = torch.Generator().manual_seed(m)
    gate, up, down = code2_experts(64, 2560, 1536, gen)
    x = torch.randn(m, 2560, generator=gen).to(DEV, BF16)
    ids, w = uneven_routing(m, 64, 6, gen)
    ref = reference.fused_moe(x.double(), ids, w, gate, up, down)
    assert rel_err(fm.fused_moe(x, ids, w, gate, up, down), ref) <= TOL[BF16]
