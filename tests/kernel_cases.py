"""Shared by the kernel tests: Triton's interpreter on CPU, random packed weights, float64 oracles, tolerances.

Without a CUDA device the kernels run in Triton's interpreter: conftest.py sets TRITON_INTERPRET=1 before any
test module (or a package it imports) imports triton, which reads it once, when its @jit functions are made.
"""

import pytest
import torch

pytest.importorskip("triton")

from quantkit.format.compressed_tensors import pack_rows  # noqa: E402
from quantkit.format.wint2 import scale_rows  # noqa: E402
from quantkit.kernels import dispatch  # noqa: E402
from quantkit.kernels.reference import Code2Weight, IntWeight  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# ‖out − ref‖ / ‖ref‖ against a float64 product of the exact dequantized weights: the output's own rounding
# (bf16 2^-9, fp16 2^-12) plus fp32 accumulation; fp32 on a GPU uses ieee dots.
TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 2e-5}
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def poison(monkeypatch):
    """Every buffer the kernels allocate starts as NaN: an element no program wrote fails the comparison."""
    monkeypatch.setattr(dispatch, "POISON", True)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def random_int_weight(lead: tuple, n: int, k: int, bits: int, group: int | None, asym: bool, gen: torch.Generator,
                      scale_dtype=torch.bfloat16, device=DEV) -> IntWeight:
    """Random codes over the full b-bit range, positive scales, random zero points; packed as on disk."""
    g = k if group is None else group
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (*lead, n, k), generator=gen, dtype=torch.int8)
    scale = (0.005 + 0.02 * torch.rand(*lead, n, k // g, generator=gen)).to(scale_dtype)
    zp = None
    if asym:
        zero = torch.randint(-half, half, (*lead, n, k // g), generator=gen, dtype=torch.int8)
        zp = pack_rows(zero.transpose(-1, -2).contiguous(), bits).transpose(-1, -2).contiguous().to(device)
    return IntWeight(pack_rows(codes, bits).to(device), scale.to(device), zp, bits, g, n, k)


def random_code2_weight(lead: tuple, n: int, k: int, gen: torch.Generator, device=DEV) -> Code2Weight:
    """Random code bytes, nibbles and scales; code_scale / code_zp multiples of 2^-8 keeping v < 2^14 (exact)."""
    qw = torch.randint(0, 256, (*lead, k // 4, n), generator=gen, dtype=torch.uint8)
    ws = torch.randint(0, 256, (*lead, scale_rows(k), n), generator=gen, dtype=torch.uint8)
    if (k // 64) % 2:  # an odd trailing group leaves the low nibble 0, as the writer does
        ws[..., -1, :] &= 0xF0
    sup = (0.0005 + 0.002 * torch.rand(*lead, n, generator=gen)).to(torch.bfloat16)
    cs = torch.randint(1, 64 * 256, (*lead, n), generator=gen).float() / 256
    zp = torch.randint(0, 64 * 256, (*lead, n), generator=gen).float() / 256
    return Code2Weight(*(t.to(device) for t in (qw, ws, sup, cs, zp)))


def code2_oracle(w: Code2Weight) -> torch.Tensor:
    """float64 [.., N, K] straight from DESIGN.md's formula (independent of quantkit.format.wint2)."""
    c = w.quant_weight.double()
    v = torch.floor(c * w.code_scale.double()[..., None, :] + w.code_zp.double()[..., None, :] + 0.5).long()
    q = torch.stack([((v >> (9 - 3 * i)) & 0x3F) - 32 for i in range(4)], dim=-2)  # [.., R, 4, N]
    *lead, r, _, n = q.shape
    q = q.reshape(*lead, 4 * r, n).double()
    nib = torch.stack([w.weight_scale >> 4, w.weight_scale & 0xF], dim=-2).reshape(*lead, -1, n).double()
    local = nib.repeat_interleave(64, dim=-2)[..., : 4 * r, :]
    return (q * local * w.super_scales.double()[..., None, :]).transpose(-1, -2)


def oracle_moe(x, ids, weights, gate_w, up_w, down_w):
    """float64 MoE from dense [E, N, K] float64 weights: Σ_k w · down(silu(gate x) · up x)."""
    x = x.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = torch.nn.functional.silu(gate_w[e] @ x[t]) * (up_w[e] @ x[t])
            out[t] += float(weights[t, j]) * (down_w[e] @ h)
    return out


def uneven_routing(t: int, e: int, k: int, gen: torch.Generator, device=DEV):
    """top-k ids drawn with skewed expert popularity (some experts get none), and normalised weights."""
    pop = torch.linspace(4.0, 0.05, e) ** 2
    ids = torch.stack([torch.multinomial(pop, k, replacement=False, generator=gen) for _ in range(t)])
    w = torch.rand(t, k, generator=gen) + 0.1
    return ids.to(device), (w / w.sum(-1, keepdim=True)).to(device)
