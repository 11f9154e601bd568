"""The reference decoder of the 2-bit code (FastDeploy WINT2 layout) and its packed layout."""

import math

import pytest
import torch

from quantkit.format import wint2
from quantkit.quant.code2 import codebook_pool


def _by_hand(c: int, cs: float, zp: float) -> list[int]:
    """The formula in plain Python: v = floor(c*cs + zp + 0.5), q_i = ((v >> (9 - 3i)) & 63) - 32."""
    v = math.floor(c * cs + zp + 0.5)
    return [((v >> (9 - 3 * i)) & 63) - 32 for i in range(4)]


def _random_code(gen, lead, k, n):
    return (torch.randint(0, 256, (*lead, k // 4, n), dtype=torch.uint8, generator=gen),
            torch.randint(0, 256, (*lead, wint2.scale_rows(k), n), dtype=torch.uint8, generator=gen),
            (torch.rand(*lead, n, generator=gen) * 0.01).to(torch.bfloat16),
            torch.round((100 + 28 * torch.rand(*lead, n, generator=gen)) * 256) / 256,
            torch.round(torch.rand(*lead, n, generator=gen) * 300 * 256) / 256)


def test_hand_built_codes_decode_to_the_formula():
    # column 0: non-integer code scale; column 1: a product that lands exactly on .5 (floor(x + 0.5) rounds up)
    cs, zp = torch.tensor([121.375, 0.5]), torch.tensor([897.25, 0.0])
    codes = torch.tensor([[200, 3], [0, 255], [17, 1]] * 16, dtype=torch.uint8)  # K = 192: three 64-groups
    local = torch.tensor([[3, 15], [0, 7], [9, 1]], dtype=torch.uint8)  # [G, N]
    packed = wint2.pack_local_scales(local)
    # group 0 in the high nibble of row 0, group 1 in its low nibble, group 2 alone (low nibble 0) in row 1
    assert packed.tolist() == [[0x30, 0xF7], [0x90, 0x10]]
    sup = torch.tensor([0.5, 0.125], dtype=torch.bfloat16)
    w = wint2.decode(codes, packed, sup, cs, zp)
    assert w.shape == (192, 2) and w.dtype == torch.float32
    assert _by_hand(3, 0.5, 0.0) == [-32, -32, -32, -30]  # 1.5 + 0.5 -> v = 2
    for k in range(192):
        r, i, g = k // 4, k % 4, k // 64
        for n in range(2):
            q = _by_hand(int(codes[r, n]), float(cs[n]), float(zp[n]))[i]
            assert w[k, n].item() == q * int(local[g, n]) * float(sup[n]), (k, n)


def test_local_scale_nibbles_round_trip_with_odd_trailing_group():
    gen = torch.Generator().manual_seed(0)
    for groups in (1, 2, 9, 40):
        local = torch.randint(0, 16, (3, groups, 5), dtype=torch.uint8, generator=gen)
        packed = wint2.pack_local_scales(local)
        assert packed.shape == (3, -(-groups // 2), 5)
        assert torch.equal(wint2.unpack_local_scales(packed, groups), local)
        if groups % 2:
            assert int((packed[:, -1] & 0xF).max()) == 0
    with pytest.raises(ValueError, match="4-bit"):
        wint2.pack_local_scales(torch.tensor([[16]], dtype=torch.uint8))
    with pytest.raises(ValueError, match="4-bit"):  # would wrap to 0xFF and spill into the neighbour nibble
        wint2.pack_local_scales(torch.tensor([[-1], [3]]))


def test_3d_experts_decode_like_each_expert_and_fused_like_separate():
    gen = torch.Generator().manual_seed(1)
    gate, up = _random_code(gen, (3,), 576, 8), _random_code(gen, (3,), 576, 8)
    stacked = wint2.decode(*gate)
    for e in range(3):
        assert torch.equal(stacked[e], wint2.decode(*(t[e] for t in gate)))
    fused = wint2.decode(*(torch.cat([g, u], dim=-1) for g, u in zip(gate, up)))  # up_gate_proj: gate columns first
    assert torch.equal(fused[..., :8], stacked) and torch.equal(fused[..., 8:], wint2.decode(*up))


def test_triton_bf16_variant_rounds_the_scale_product_first():
    gen = torch.Generator().manual_seed(2)
    code = _random_code(gen, (), 128, 64)
    exact = wint2.decode(*code)
    tri = wint2.decode_triton_bf16(*code)
    q = wint2.decode_q(code[0], code[3], code[4]).float()
    s = wint2.column_scales(code[1], code[2], 128).to(torch.bfloat16).float().repeat_interleave(64, dim=0)
    assert tri.dtype == torch.bfloat16 and torch.equal(tri, (q * s).to(torch.bfloat16))
    # both are the same weights up to bf16 rounding
    assert torch.allclose(tri.float(), exact, rtol=2 ** -7, atol=0)


def test_bad_shapes_and_k_not_multiple_of_64_are_errors():
    gen = torch.Generator().manual_seed(3)
    qw, ws, sup, cs, zp = _random_code(gen, (), 128, 4)
    with pytest.raises(ValueError, match="multiple of 64"):
        wint2.decode(qw[:8], ws, sup, cs, zp)  # K = 32
    with pytest.raises(ValueError, match="weight_scale shape"):
        wint2.decode(qw, ws[:, :2], sup, cs, zp)
    with pytest.raises(ValueError, match="multiple of 64"):
        wint2.tensor_specs("x", 4, 96)


def test_encoder_codebooks_decode_exactly_in_any_float_order():
    """Our code_scale/code_zp are multiples of 2^-8: plain fp32 mul-then-add equals the FMA reference."""
    cs, zp = codebook_pool(8)[:2]
    c = torch.arange(256, dtype=torch.float32)[:, None]
    plain = torch.floor(c * cs + zp + 0.5).to(torch.int32)
    ref = wint2.affine_values(torch.arange(256, dtype=torch.uint8)[:, None].expand(256, len(cs)), cs, zp)
    assert torch.equal(plain, ref) and int(ref.min()) >= 0 and int(ref.max()) < 2 ** 15
