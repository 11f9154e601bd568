"""Trellis-code GEMM and fused MoE (Triton) against a float64 oracle written from the format's documented
decoding (bit stream -> shift-register states -> MUL1 values -> Hadamards and scales), independent of
``quantkit.format.trellis``, and against the torch twin (issue 13)."""

import math

import pytest
import torch
from kernel_cases import DEV, TOL, gpu, oracle_moe, poison, rel_err, uneven_routing  # noqa: F401

from quantkit.format import trellis as fmt
from quantkit.kernels import dense, dispatch, reference
from quantkit.kernels.dense import Config, launch_linear
from quantkit.kernels.reference import TrellisWeight
from quantkit.kernels.trellis import trellis_launch_args, trellis_linear, trellis_moe

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def random_trellis_weight(lead: tuple, n: int, k: int, gen: torch.Generator, bits: int = 2, L: int = 16) -> TrellisWeight:
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (*lead, n // 16, k // 16, 8 * bits), generator=gen, dtype=torch.int32)
    suh = ((torch.rand(*lead, k, generator=gen) + 0.5) * (torch.randint(0, 2, (*lead, k), generator=gen) * 2 - 1) * 0.08)
    svh = ((torch.rand(*lead, n, generator=gen) + 0.5) * (torch.randint(0, 2, (*lead, n), generator=gen) * 2 - 1) * 2e-3)
    return TrellisWeight(words.to(DEV), suh.half().to(DEV), svh.half().to(DEV), bits, L)


def _sylvester(b: int) -> torch.Tensor:
    h = torch.tensor([[1.0]], dtype=torch.float64)
    for _ in range(int(math.log2(b))):
        h = torch.kron(torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64), h)
    return h / math.sqrt(b)


def _block_h(d: int) -> torch.Tensor:
    b = 128
    while d % b:
        b //= 2
    return torch.block_diag(*[_sylvester(b)] * (d // b))


def q_oracle(words: torch.Tensor, bits: int, L: int) -> torch.Tensor:
    """Integer values [N, K] (float64) of one weight: the tile's stream bit by bit, the shift register, MUL1."""
    i, j, nw = words.shape
    u = words.long().cpu() & 0xFFFFFFFF
    stream = torch.stack([(u >> (31 - b)) & 1 for b in range(32)], -1).reshape(i, j, 32 * nw)  # MSB first
    sym = sum(stream[..., b::bits] << (bits - 1 - b) for b in range(bits))  # [i, j, 256]
    s = torch.zeros(i, j, dtype=torch.long)
    for b in range(32 * nw - L, 32 * nw):  # s_{-1}: the last L bits of the circular stream
        s = (s << 1) | stream[..., b]
    vals = []
    for t in range(256):
        s = ((s << bits) | sym[..., t]) & ((1 << L) - 1)
        x = (s * 2212286765) % (1 << 32)  # 0x83DCD12D
        vals.append(sum((x >> (8 * q)) & 255 for q in range(4)) - 510)
    q = torch.stack(vals, -1).reshape(i, j, 16, 16).transpose(1, 2).reshape(16 * i, 16 * j)
    return q.double()


def trellis_oracle(w: TrellisWeight) -> torch.Tensor:
    """float64 [.., N, K] = diag(svh) H_N Q H_K diag(suh)."""
    if w.trellis.dim() == 4:
        return torch.stack([trellis_oracle(w.select(e)) for e in range(w.trellis.shape[0])])
    q = q_oracle(w.trellis, w.bits, w.L)
    n, k = q.shape
    return (torch.diag(w.svh.double().cpu()) @ _block_h(n) @ q @ _block_h(k) @ torch.diag(w.suh.double().cpu())).to(DEV)


def test_oracle_is_the_format_decoder():
    gen = torch.Generator().manual_seed(0)
    for bits, L in ((2, 16), (3, 12), (4, 10)):
        w = random_trellis_weight((), 32, 128, gen, bits, L)
        assert torch.equal(fmt.decode_q(w.trellis, bits, L).double().cpu(), q_oracle(w.trellis, bits, L))
        assert rel_err(w.dequantize(), trellis_oracle(w)) <= 1e-6


@pytest.mark.parametrize("bits, L", [(2, 16), (3, 16), (4, 16), (2, 10)])
def test_tile_decode_is_bit_exact(bits, L):
    """The kernel's GEMM alone on the identity: I @ Q^T = Q^T exactly (integers, fp32 products) — the values
    decoded in registers are the format's value table, entry for entry."""
    gen = torch.Generator().manual_seed(bits + L)
    w = random_trellis_weight((), 48, 128, gen, bits, L)
    eye = torch.eye(128, device=DEV)
    qt = launch_linear(eye, *trellis_launch_args(w), None, None)
    assert torch.equal(qt.t(), fmt.decode_q(w.trellis, bits, L))


CASES = [(1, 48, 128, BF16), (3, 32, 192, FP16), (16, 80, 256, BF16), (33, 64, 128, FP32)]


@pytest.mark.parametrize("seed, case", list(enumerate(CASES)), ids=lambda c: c if isinstance(c, int) else
                         f"m{c[0]}-n{c[1]}-k{c[2]}-{str(c[3])[6:]}")
def test_trellis_linear_matches_float64(seed, case):
    m, n, k, dtype = case
    gen = torch.Generator().manual_seed(seed)
    w = random_trellis_weight((), n, k, gen)
    x = torch.randn(m, k, generator=gen).to(DEV, dtype)
    out = trellis_linear(x, w)
    assert out.shape == (m, n) and out.dtype == dtype
    assert rel_err(out, x.double() @ trellis_oracle(w).t()) <= TOL[dtype]
    assert rel_err(out, reference.linear(x, w).double()) <= TOL[dtype]  # the twin


@pytest.mark.parametrize("config", [Config(16, 16, 64, split_k=2), Config(32, 32, 64, scale_in_tile=True)])
def test_trellis_explicit_configs(config):
    gen = torch.Generator().manual_seed(7)
    w = random_trellis_weight((), 32, 192, gen)
    x = torch.randn(5, 192, generator=gen).to(DEV, BF16)
    assert rel_err(trellis_linear(x, w, config=config), x.double() @ trellis_oracle(w).t()) <= TOL[BF16]


def test_k_must_fill_whole_kernel_tiles_and_gate_up_is_not_paired():
    gen = torch.Generator().manual_seed(1)
    w = random_trellis_weight((), 32, 48, gen)
    with pytest.raises(ValueError, match="64-input tiles"):
        trellis_linear(torch.zeros(1, 48, device=DEV), w)
    assert dispatch.tile_k(w) == 0  # the dispatcher sends it to the twin instead
    x = torch.randn(2, 48, generator=gen)
    assert torch.equal(dispatch.linear(x, w, None, "triton"), reference.linear(x, w))
    g, u = random_trellis_weight((), 32, 64, gen), random_trellis_weight((), 32, 64, gen)
    assert dense.gate_up(torch.zeros(1, 64, device=DEV), g, u) is None  # SiLU needs the output Hadamard first


def trellis_experts(e, hdim, inter, gen):
    return (random_trellis_weight((e,), inter, hdim, gen), random_trellis_weight((e,), inter, hdim, gen),
            random_trellis_weight((e,), hdim, inter, gen))


@pytest.mark.parametrize("t, e, k, dtype", [(1, 8, 2, BF16), (2, 4, 2, FP32), (16, 6, 3, FP16), (33, 8, 3, BF16)])
def test_fused_moe_trellis_matches_float64(t, e, k, dtype):
    """Uneven routing leaves some experts without tokens; poisoned buffers catch rows no program wrote."""
    gen = torch.Generator().manual_seed(t + e)
    gate, up, down = trellis_experts(e, 128, 64, gen)
    x = torch.randn(t, 128, generator=gen).to(DEV, dtype)
    ids, w = uneven_routing(t, e, k, gen)
    add = torch.randn(t, 128, generator=gen).to(DEV, dtype)
    out = dispatch.fused_moe(x, ids, w, gate, up, down, "triton", add)
    ref = oracle_moe(x, ids, w, *(trellis_oracle(p) for p in (gate, up, down))) + add.double()
    assert rel_err(out, ref) <= TOL[dtype]
    twin = reference.fused_moe(x, ids, w, gate, up, down, add).double()
    assert rel_err(out, twin) <= 1.5 * TOL[dtype]


def test_fused_moe_no_tokens():
    gen = torch.Generator().manual_seed(2)
    gate, up, down = trellis_experts(2, 64, 64, gen)
    x = torch.zeros(0, 64, device=DEV)
    ids = torch.zeros(0, 2, dtype=torch.long, device=DEV)
    assert trellis_moe(x, ids, torch.zeros(0, 2, device=DEV), gate, up, down).shape == (0, 64)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 256])
def test_full_shapes_gpu(m):
    gen = torch.Generator().manual_seed(m)
    for n, k in [(1536, 2560), (2560, 1536)]:
        w = random_trellis_weight((), n, k, gen)
        x = torch.randn(m, k, generator=gen).to(DEV, BF16)
        assert rel_err(trellis_linear(x, w), reference.linear(x.double(), w)) <= TOL[BF16]
    gate, up, down = trellis_experts(64, 2560, 1536, gen)
    x = torch.randn(m, 2560, generator=gen).to(DEV, BF16)
    ids, w = uneven_routing(m, 64, 6, gen)
    ref = reference.fused_moe(x.double(), ids, w, gate, up, down)
    assert rel_err(trellis_moe(x, ids, w, gate, up, down), ref) <= TOL[BF16]
