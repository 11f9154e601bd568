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
