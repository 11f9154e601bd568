"""The trellis format (``quantkit.format.trellis``): bit order, states, tiles, values, Hadamard, the decoder,
and the encoder's tail-biting / LDLQ, each against an independent plain-Python or float64 reference."""

import math

import pytest
import torch

from quantkit.format import trellis as F
from quantkit.quant.trellis import encode_tiles, trellis, viterbi


def _stream_bits(sym: list[int], bits: int) -> list[int]:
    """The tile's bit stream in plain Python: each symbol's bits, most significant first."""
    return [(v >> (bits - 1 - i)) & 1 for v in sym for i in range(bits)]


def _words_by_hand(sym: list[int], bits: int) -> list[int]:
    bs = _stream_bits(sym, bits)
    out = []
    for w in range(len(bs) // 32):
        u = sum(b << (31 - j) for j, b in enumerate(bs[32 * w:32 * w + 32]))
        out.append(u - (1 << 32) if u >= 1 << 31 else u)
    return out


@pytest.mark.parametrize("bits", F.BITS)
def test_pack_matches_the_stream_by_hand_and_round_trips(bits):
    gen = torch.Generator().manual_seed(bits)
    sym = torch.randint(0, 1 << bits, (3, 256), generator=gen)
    words = F.pack_symbols(sym, bits)
    assert words.dtype == torch.int32 and words.shape == (3, 8 * bits)
    for row in range(3):
        assert words[row].tolist() == _words_by_hand(sym[row].tolist(), bits)
    assert torch.equal(F.unpack_symbols(words, bits), sym)
    with pytest.raises(ValueError, match="-bit"):
        F.pack_symbols(sym + (1 << bits), bits)


@pytest.mark.parametrize("bits,L", [(2, 16), (3, 16), (4, 16), (2, 8), (3, 10)])
def test_states_are_the_circular_shift_register(bits, L):
    """s_t = ((s_{t-1} << bits) | b_t) & mask, started from the window that ends at the stream's end."""
    gen = torch.Generator().manual_seed(L)
    sym = torch.randint(0, 1 << bits, (256,), generator=gen).tolist()
    bs = _stream_bits(sym, bits)
    s = 0
    for b in bs[-L:]:  # the last L bits of the stream: s_{-1}
        s = (s << 1) | b
    expect = []
    for v in sym:
        s = ((s << bits) | v) & ((1 << L) - 1)
        expect.append(s)
    got = F.states(F.pack_symbols(torch.tensor(sym), bits), bits, L)
    assert got.tolist() == expect
    assert F.symbols_from_states(got, bits).tolist() == sym


def test_value_code_by_hand():
    def mul1(s):
        x = (s * 0x83DCD12D) % (1 << 32)
        return sum((x >> (8 * i)) & 0xFF for i in range(4)) - 510

    table = F.value_table(16)
    for s in (0, 1, 2, 255, 4096, 40000, 65535):
        assert table[s].item() == mul1(s)
    assert table.min() >= -510 and table.max() <= 510
    assert abs(table.pow(2).mean().sqrt().item() - F.VALUE_RMS) < 2.0  # the RMS the scales assume
    assert abs(table.mean().item()) < 2.0


def test_tiles_layout():
    q = torch.arange(32 * 48).reshape(32, 48)
    t = F.to_tiles(q)
    assert t.shape == (2, 3, 256)
    assert t[1, 2, 16 * 5 + 7].item() == q[16 + 5, 32 + 7].item()
    assert torch.equal(F.from_tiles(t), q)


def test_hadamard_blocks_and_rotation():
    assert [F.hadamard_block(d) for d in (2560, 1536, 576, 128, 48)] == [128, 128, 64, 128, 16]
    with pytest.raises(ValueError):
        F.hadamard_block(40)
    h = F.hadamard(8, torch.float64)
    assert torch.allclose(h @ h, torch.eye(8, dtype=torch.float64))
    assert torch.all(h.abs() == 1 / math.sqrt(8))
    w = torch.randn(2, 32, 64, dtype=torch.float64)
    assert torch.allclose(F.rotate(F.rotate(w)), w)
    # block-diagonal: K = 96 is three blocks of 32
    x = torch.randn(5, 96, dtype=torch.float64)
    y = F.hadamard_last(x)  # blocks of 32
    assert torch.allclose(y[:, :32], x[:, :32] @ F.hadamard(32, torch.float64))


def test_decode_is_the_documented_product():
    gen = torch.Generator().manual_seed(3)
    n, k, bits, L = 32, 64, 2, 12
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (n // 16, k // 16, 16), dtype=torch.int32, generator=gen)
    suh = (torch.rand(k, generator=gen) - 0.5).half()
    svh = (torch.rand(n, generator=gen) - 0.5).half()
    q = torch.empty(n, k, dtype=torch.float64)
    table = F.value_table(L).double()
    for i in range(n // 16):
        for j in range(k // 16):
            s = F.states(words[i, j], bits, L)
            q[16 * i:16 * i + 16, 16 * j:16 * j + 16] = table[s].reshape(16, 16)
    hn = torch.block_diag(*[F.hadamard(32, torch.float64)])
    hk = torch.block_diag(*[F.hadamard(64, torch.float64)])
    expect = torch.diag(svh.double()) @ hn @ q @ hk @ torch.diag(suh.double())
    got = F.decode(words, suh, svh, bits, L)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), expect, rtol=1e-5, atol=1e-4)


def test_bits_per_weight_counts_every_byte():
    n, k = 1536, 2560
    stored = sum(math.prod(s.shape) * s.dtype.itemsize for s in F.tensor_specs("p", n, k, 2))
    assert stored * 8 / (n * k) == pytest.approx(F.bits_per_weight(n, k, 2))
    assert F.bits_per_weight(n, k, 2) < 2.02


def test_viterbi_finds_the_exhaustive_optimum_on_a_short_sequence():
    """Short sequences (T = 5) and L = 8, K = 2: the forward pass's best cost equals the minimum over every
    state path (4^5 * 2^6 of them) that obeys the shift register."""
    L, bits, T = 8, 2, 5
    table = F.value_table(L).double() / F.VALUE_RMS
    x = torch.randn(1, T, dtype=torch.float64)
    C, _ = viterbi(x, table, bits)
    best = math.inf
    for s0 in range(1 << L):
        for tail in range(4 ** (T - 1)):
            s, cost = s0, (x[0, 0] - table[s0]) ** 2
            for t in range(1, T):
                s = ((s << bits) | ((tail >> (2 * (t - 1))) & 3)) & 0xFF
                cost += (x[0, t] - table[s]) ** 2
            best = min(best, float(cost))
    assert float(C.min() + x.pow(2).sum()) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("bits", [2, 3])
def test_encoder_paths_are_circular_and_good(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(16, 256, generator=gen) * F.VALUE_RMS
    s = encode_tiles(x, bits, 8)
    words = F.pack_symbols(F.symbols_from_states(s, bits), bits)
    assert torch.equal(F.states(words, bits, 8), s)  # the stored stream reproduces the path, wrap included
    mse = ((F.value_table(8)[s] - x) ** 2).mean().item() / F.VALUE_RMS ** 2
    assert mse < {2: 0.09, 3: 0.028}[bits]  # L = 8; scalar Lloyd-Max is 0.1175 (2 bits) and 0.0345 (3 bits)


def test_trellis_matrix_and_ldlq():
    gen = torch.Generator().manual_seed(5)
    E, n, k = 2, 32, 64
    w = torch.randn(E, n, k, generator=gen) * 0.02
    X = torch.randn(E, 512, k, generator=gen) @ (torch.eye(k) + 0.5 * torch.randn(k, k, generator=gen) / 8)
    H = X.transpose(1, 2) @ X
    plain = trellis(w, bits=2, L=8)
    assert plain.trellis.shape == (E, 2, 4, 16) and plain.suh.dtype == torch.float16
    assert torch.equal(plain.select(1).dequantize(), plain.dequantize()[1])
    d = plain.dequantize() - w
    assert d.pow(2).mean() / w.pow(2).mean() < 0.1
    hq = trellis(w, H, bits=2, L=8)

    def herr(t):
        dd = t.dequantize() - w
        return ((dd @ H) * dd).sum().item()

    assert herr(hq) < 0.9 * herr(plain)  # LDLQ lowers the output error the Hessian measures
    one = trellis(w[0], bits=2, L=8)
    assert one.trellis.shape == (2, 4, 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        trellis(torch.randn(20, 64))
    with pytest.raises(ValueError, match="state bits"):
        trellis(w, L=20)
