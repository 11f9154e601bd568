"""RMSNorm and RoPE kernels (Triton) against their torch twins in ``quantkit.model.layers`` (which the HF parity
tests check against transformers): widths on and off powers of two, bf16 / fp16 / fp32, weights in another
dtype than the activations, and a transposed [B, heads, T, D] view as the attention passes it."""

import pytest
import torch
from kernel_cases import DEV, poison, rel_err  # noqa: F401

from quantkit.kernels.pointwise import rms_norm, rope
from quantkit.model.layers import RotaryEmbedding, apply_rope
from quantkit.model.layers import rms_norm as torch_rms_norm

# Same arithmetic as the twins (the interpreter matches them bit for bit in bf16/fp16); on a GPU, rsqrt and fused
# multiply-adds may flip the rounding of a few elements by one unit in the last place.
TOL = {torch.bfloat16: 2e-3, torch.float16: 5e-4, torch.float32: 1e-6}


@pytest.mark.parametrize("shape, hdim, dtype, wdtype", [((1, 1), 2560, torch.bfloat16, torch.bfloat16),
                                                       ((2, 3), 96, torch.float16, torch.float32),
                                                       ((5,), 130, torch.float32, torch.float32),
                                                       ((0,), 64, torch.bfloat16, torch.bfloat16)])
def test_rms_norm_matches_torch(shape, hdim, dtype, wdtype):
    gen = torch.Generator().manual_seed(hdim)
    x = (3 * torch.randn(*shape, hdim, generator=gen)).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(hdim, generator=gen)).to(DEV, wdtype)
    out, ref = rms_norm(x, w, 1e-5), torch_rms_norm(x, w, 1e-5)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if ref.numel():
        assert rel_err(out, ref.double()) <= TOL[dtype]


@pytest.mark.parametrize("b, heads, t, d, dtype", [(1, 20, 1, 128, torch.bfloat16), (2, 4, 5, 32, torch.float16),
                                                   (1, 2, 3, 64, torch.float32)])
def test_rope_matches_torch_on_a_transposed_view(b, heads, t, d, dtype):
    gen = torch.Generator().manual_seed(d + t)
    x = torch.randn(b, t, heads, d, generator=gen).to(DEV, dtype).transpose(1, 2)  # as Attention passes q / k
    cos, sin = RotaryEmbedding(d, 500000.0).to(DEV)(torch.arange(7, 7 + t, device=DEV))
    out, ref = rope(x, cos, sin), apply_rope(x, cos, sin)
    assert out.shape == ref.shape and out.dtype == dtype
    assert rel_err(out, ref.double()) <= TOL[dtype]


def test_rope_refuses_odd_head_dims():
    with pytest.raises(ValueError, match="power-of-two head dim"):
        rope(torch.zeros(1, 1, 1, 48, device=DEV), torch.zeros(1, 48, device=DEV), torch.zeros(1, 48, device=DEV))


# float64 reference of the variants: ‖out − ref‖ / ‖ref‖ is the output's own rounding (bf16 2^-9, fp16 2^-12)
ORACLE_TOL = {torch.bfloat16: 4e-3, torch.float16: 5e-4, torch.float32: 1e-6}


def rope_tables(r: int, positions: torch.Tensor, style: str, theta: float = 10000.0):
    """cos/sin [T, R] fp32 as transformers builds them: rotate-half concatenates the frequencies, interleaved repeats."""
    inv_freq = 1.0 / theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    freqs = positions.double()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), -1) if style == "half" else freqs.repeat_interleave(2, -1)
    return emb.cos().float(), emb.sin().float()


def rope_oracle(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    x, cos, sin = x.double(), cos.double(), sin.double()
    r = cos.shape[-1]
    rot, keep = x[..., :r], x[..., r:]
    if style == "half":
        rotated = torch.cat((-rot[..., r // 2:], rot[..., : r // 2]), -1)
    else:
        rotated = torch.stack((-rot[..., 1::2], rot[..., 0::2]), -1).flatten(-2)
    return torch.cat((rot * cos + rotated * sin, keep), -1)


@pytest.mark.parametrize("style, b, heads, t, d, r, dtype", [
    ("half", 1, 4, 3, 128, 128, torch.bfloat16), ("half", 2, 3, 5, 64, 64, torch.float32),
    ("half", 1, 2, 4, 128, 64, torch.bfloat16),  # GLM-4.5: rotate-half on the first half of each head
    ("half", 1, 2, 3, 96, 32, torch.float16),  # a head dim off the powers of two: only the rotated part must be one
    ("interleaved", 1, 2, 3, 64, 32, torch.float32), ("interleaved", 2, 4, 2, 128, 128, torch.bfloat16)])
def test_rope_variants_match_a_float64_reference(style, b, heads, t, d, r, dtype):
    gen = torch.Generator().manual_seed(d + r + t)
    x = torch.randn(b, t, heads, d, generator=gen).to(DEV, dtype).transpose(1, 2)
    cos, sin = rope_tables(r, torch.arange(11, 11 + t), style)
    out = rope(x, cos.to(DEV), sin.to(DEV), style=style, rotary_dim=r)
    assert out.shape == x.shape and out.dtype == dtype and out.is_contiguous()
    assert rel_err(out, rope_oracle(x, cos, sin, style).to(DEV)) <= ORACLE_TOL[dtype]
    assert torch.equal(out[..., r:], x[..., r:])  # the pass-through part is copied bit for bit


def test_rope_oracle_is_transformers_rotate_half():
    """The float64 reference above is transformers' partial rotate-half RoPE (GLM-4.5's ``apply_rotary_pos_emb``)."""
    from transformers.models.glm4_moe.modeling_glm4_moe import apply_rotary_pos_emb

    x = torch.randn(1, 2, 3, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cos, sin = rope_tables(32, torch.arange(3), "half")
    ref, _ = apply_rotary_pos_emb(x, x, cos.double()[None], sin.double()[None])
    torch.testing.assert_close(rope_oracle(x, cos, sin, "half"), ref, rtol=0, atol=1e-12)


def test_interleaved_style_is_the_default_ernie_path():
    x = torch.randn(1, 2, 3, 64, generator=torch.Generator().manual_seed(5)).to(DEV, torch.bfloat16)
    cos, sin = RotaryEmbedding(64, 500000.0).to(DEV)(torch.arange(3, device=DEV))
    assert torch.equal(rope(x, cos, sin), rope(x, cos, sin, style="interleaved", rotary_dim=64))


def test_rope_refuses_bad_rotary_dims_and_styles():
    z = torch.zeros(1, 1, 1, 64, device=DEV)
    with pytest.raises(ValueError, match="rotary dim 24"):
        rope(z, torch.zeros(1, 24, device=DEV), torch.zeros(1, 24, device=DEV), style="half", rotary_dim=24)
    with pytest.raises(ValueError, match="rotary dim 128"):
        rope(z, torch.zeros(1, 128, device=DEV), torch.zeros(1, 128, device=DEV), rotary_dim=128)
    with pytest.raises(ValueError, match="style"):
        rope(z, torch.zeros(1, 64, device=DEV), torch.zeros(1, 64, device=DEV), style="neox")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_head_qk_norm_is_rms_norm_on_the_head_dim(dtype):
    """Qwen3's per-head q/k RMSNorm: the rms_norm kernel on [B, heads, T, D] (a transposed view) normalises each
    head's D values, as transformers' ``Qwen3MoeRMSNorm`` on [B, T, heads, D]."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    gen = torch.Generator().manual_seed(3)
    q = (2 * torch.randn(2, 5, 4, 64, generator=gen)).to(DEV, dtype)  # [B, T, heads, D] as q_proj's output
    norm = Qwen3MoeRMSNorm(64, eps=1e-6).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64, generator=gen))
        ref = norm(q).transpose(1, 2)
    out = rms_norm(q.transpose(1, 2), norm.weight, 1e-6)
    assert out.shape == ref.shape == (2, 4, 5, 64) and out.dtype == ref.dtype
    assert rel_err(out, ref.double()) <= TOL[dtype]
