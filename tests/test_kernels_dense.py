"""Dense int dequant-GEMM (Triton) against float64 products of the dequantized weights and against its torch
twin; on CPU under Triton's interpreter (small shapes), on a GPU also at ERNIE-21B shapes (marker ``gpu``)."""

import math

import pytest
import torch
from kernel_cases import DEV, TOL, gpu, poison, random_int_weight, rel_err  # noqa: F401  (poison: autouse fixture)

from quantkit.errors import UsageError
from quantkit.kernels import dense, dispatch, reference
from quantkit.kernels.dense import Config, int_linear, pick_config

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (M, N, K, bits, group (None: per channel), asym, dtype): N and K off the tile sizes where the format allows
CASES = [
    (1, 72, 256, 4, 128, False, BF16),
    (3, 72, 256, 4, 64, True, FP16),
    (16, 40, 192, 2, 32, True, BF16),
    (33, 24, 100, 8, None, True, BF16),
    (33, 72, 256, 4, 128, True, FP32),
    (3, 40, 160, 8, 32, False, FP16),
    (1, 50, 96, 2, None, False, BF16),
    (16, 130, 128, 4, 32, False, FP16),
    (3, 24, 96, 4, 48, True, BF16),  # a non-power-of-two group: 16-wide K tiles
]


def check(m, n, k, bits, group, asym, dtype, seed, config=None):
    gen = torch.Generator().manual_seed(seed)
    w = random_int_weight((), n, k, bits, group, asym, gen)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    ref = x.double() @ w.dequantize(torch.float64).t()
    out = int_linear(x, w, config=config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, ref) <= TOL[dtype]
    assert rel_err(out, reference.int_linear(x, w).double()) <= TOL[dtype]  # the twin computes the same function


@pytest.mark.parametrize("seed, case", list(enumerate(CASES)), ids=lambda c: c if isinstance(c, int) else f"m{c[0]}-n{c[1]}-k{c[2]}-w{c[3]}g{c[4]}-{'asym' if c[5] else 'sym'}-{str(c[6])[6:]}")
def test_int_linear_matches_float64(seed, case):
    check(*case, seed=seed)


@pytest.mark.parametrize("config", [
    Config(16, 32, 32, split_k=3),                      # K tiles smaller than the group, uneven split
    Config(32, 64, 64, split_k=1, scale_in_tile=True),  # prefill variant: scales in the tile, chained accumulator
    Config(16, 16, 128, split_k=8),                     # more splits than K tiles: empty splits write zeros
])
def test_explicit_configs(config):
    check(33, 72, 256, 4, 128, True, BF16, seed=1, config=config)
    check(5, 40, 256, 2, 128, False, FP16, seed=2, config=config)


def swiglu(x, g, u):
    """float64 oracle of the fused gate/up: silu(x G^T) * (x U^T)."""
    a = x.double() @ g.t()
    return a * torch.sigmoid(a) * (x.double() @ u.t())


@pytest.mark.parametrize("m, n, k, bits, group, asym, dtype, config", [
    (1, 72, 256, 4, 128, False, BF16, None),                       # decode default: split-K on this "GPU"
    (3, 40, 192, 2, 32, True, FP16, Config(16, 32, 32, split_k=3)),  # uneven split, asym
    (33, 72, 256, 8, None, True, BF16, None),                      # per channel, no split
    (33, 24, 128, 4, 64, False, FP32, Config(32, 64, 64, scale_in_tile=True)),
])
def test_gate_up_matches_float64(m, n, k, bits, group, asym, dtype, config):
    """One launch for a SwiGLU's gate and up: both weights decoded per tile, silu * up after the (split) sums."""
    gen = torch.Generator().manual_seed(m + n + k)
    g, u = (random_int_weight((), n, k, bits, group, asym, gen) for _ in range(2))
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    out = dense.gate_up(x, g, u, config)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, swiglu(x, g.dequantize(torch.float64), u.dequantize(torch.float64))) <= TOL[dtype]
    assert rel_err(out, reference.gate_up(x, g, u).double()) <= 1.5 * TOL[dtype]
    assert all(int(c.abs().sum()) == 0 for c in dispatch._COUNTERS.values())


def test_gate_up_refuses_mixed_schemes_and_dispatch_falls_back():
    gen = torch.Generator().manual_seed(9)
    g = random_int_weight((), 40, 128, 4, 64, False, gen)
    u = random_int_weight((), 40, 128, 4, 32, False, gen)
    x = torch.randn(3, 128, generator=gen).to(DEV, BF16)
    assert dense.gate_up(x, g, u) is None  # different groups: not a pair
    out = dispatch.gate_up(x, g, u, "triton")  # two launches and a torch SiLU product instead
    assert rel_err(out, swiglu(x, g.dequantize(torch.float64), u.dequantize(torch.float64))) <= TOL[BF16]


def test_split_k_leaves_counters_at_zero_and_repeats_exactly():
    """The split that arrives last reduces the tile and zeroes its counter: a second launch (which reuses the
    counters) gives the same bits, and every counter is zero after each launch."""
    gen = torch.Generator().manual_seed(4)
    w = random_int_weight((), 72, 512, 4, 128, False, gen)
    x = torch.randn(3, 512, generator=gen).to(DEV, BF16)
    cfg = Config(16, 32, 64, split_k=4)
    first = int_linear(x, w, config=cfg)
    assert dispatch._COUNTERS  # the split launch made (and so checks) a counter buffer
    assert all(int(c.abs().sum()) == 0 for c in dispatch._COUNTERS.values())
    assert torch.equal(int_linear(x, w, config=cfg), first)
    assert all(int(c.abs().sum()) == 0 for c in dispatch._COUNTERS.values())
    assert rel_err(first, x.double() @ w.dequantize(torch.float64).t()) <= TOL[BF16]


def test_leading_dims_and_bias():
    gen = torch.Generator().manual_seed(3)
    w = random_int_weight((), 48, 128, 4, 64, True, gen)
    x = torch.randn(2, 3, 128, generator=gen).to(DEV, BF16)
    bias = torch.randn(48, generator=gen).to(DEV, BF16)
    out = int_linear(x, w, bias)
    ref = x.double() @ w.dequantize(torch.float64).t() + bias.double()
    assert out.shape == (2, 3, 48) and rel_err(out, ref) <= TOL[BF16]


def test_poisoned_buffers_are_nan():
    assert torch.isnan(dispatch.empty((3, 4), torch.float32, DEV)).all()


def test_decode_config_splits_k_to_fill_the_gpu():
    cfg = pick_config(1, 2560, 2560, 128, 8)
    assert cfg.bm == 16 and cfg.split_k == 1  # 40 output tiles already exceed 8 SMs
    h100 = pick_config(1, 2560, 2560, 128, 132)
    assert h100.split_k > 1 and math.ceil(2560 / h100.bn) * h100.split_k <= 2 * 132  # about two programs per SM
    small = pick_config(1, 64, 2048, 128, 8)
    assert small.split_k > 1 and small.bm == 16
    assert pick_config(2048, 2560, 2560, 128, 8).scale_in_tile


def test_k_tile_is_the_one_readability_rule():
    gen = torch.Generator().manual_seed(5)

    def tile(bits, group, k):
        return dispatch.tile_k(random_int_weight((), 8, k, bits, group, False, gen))

    assert (tile(4, 128, 2560), tile(4, 32, 2560), tile(8, None, 100), tile(4, 256, 512)) == (128, 32, 128, 128)
    assert tile(4, 48, 96) == 16  # a non-power-of-two group with a 16-divisor: 16-wide tiles
    assert (tile(4, 8, 64), tile(4, 24, 48), tile(3, 32, 64)) == (0, 0, 0)  # groups under 16 / no 16-divisor / 3-bit
    assert dispatch.kernel_reads(random_int_weight((), 8, 96, 4, 48, False, gen))


def test_unsupported_weights_take_the_torch_path():
    gen = torch.Generator().manual_seed(4)
    w3 = random_int_weight((), 24, 64, 3, 32, True, gen)  # 3-bit fields straddle int32 words
    x = torch.randn(2, 64, generator=gen).to(DEV, FP32)
    assert not dispatch.kernel_reads(w3)
    assert torch.equal(dispatch.linear(x, w3, None, "triton"), reference.int_linear(x, w3))
    with pytest.raises(ValueError, match="2/4/8-bit"):
        int_linear(x, w3)


def test_backend_resolution(monkeypatch):
    assert dispatch.resolve("torch", "cpu") == "torch"
    assert dispatch.resolve("auto", "cpu") == "torch"
    with pytest.raises(UsageError, match="unknown backend"):
        dispatch.resolve("cuda", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(UsageError, match="needs a CUDA device"):
        dispatch.resolve("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve("triton", "cpu") == "triton"


# -- full shapes, GPU only ----------------------------------------------------------------------------

ERNIE_DENSE = [(2560, 2560), (512, 2560), (2560, 2560), (3072, 2560), (2560, 3072), (103424 // 8, 2560)]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256, 2048])
@pytest.mark.parametrize("scheme", [(4, 128, False), (4, 128, True), (2, 64, True), (8, None, False)])
def test_full_shapes_gpu(m, scheme):
    bits, group, asym = scheme
    for i, (n, k) in enumerate(ERNIE_DENSE):
        check(m, n, k, bits, group, asym, BF16, seed=10 * m + i)
    check(m, 2560, 2560, bits, group, asym, FP16, seed=m)
