"""RMSNorm and ERNIE's interleaved RoPE as one Triton launch each; the twins are ``layers.rms_norm`` and
``layers.apply_rope``.

In torch each is six to eight small launches (casts, square, mean, rsqrt, products; stack, negate, products,
sum), a few µs apiece in a decode step: two norms and two rotations per layer came to more launches than the
whole quantized MoE block. Here one program handles one row (a token's hidden vector; one head of one token)
with the same arithmetic: statistics and rotation in fp32, the result cast to the activation dtype where the
twin casts it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels import dispatch
from quantkit.kernels.tiles import cast, interpreted


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, H, stride_x, stride_o, eps, BH: tl.constexpr, INTERPRET: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BH)
    mask = offs < H
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    h = x.to(tl.float32)
    h = h * tl.rsqrt(tl.sum(h * h, axis=0) / H + eps)
    h = cast(h, x_ptr.dtype.element_ty, INTERPRET).to(tl.float32)  # normalised in x's dtype, as the twin
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, cast(w * h, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


INTERPRET = interpreted(_rms_norm_kernel)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [.., H] -> RMSNorm(x) * weight, in the dtype torch would give ``weight * x`` (``layers.rms_norm``)."""
    hdim = x.shape[-1]
    x2 = x.reshape(-1, hdim)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = dispatch.empty(x2.shape, torch.promote_types(weight.dtype, x.dtype), x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, out, hdim, x2.stride(0), out.stride(0), eps,
                                         BH=triton.next_power_of_2(hdim), INTERPRET=INTERPRET,
                                         num_warps=4 if hdim <= 4096 else 8)
    return out.reshape(x.shape)


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, HEADS, T, sb, sh, st, HALF: tl.constexpr,
                 INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    t = pid % T
    bh = pid // T
    src = x_ptr + (bh // HEADS).to(tl.int64) * sb + (bh % HEADS) * sh + t * st
    i = tl.arange(0, HALF)
    even = tl.load(src + 2 * i).to(tl.float32)
    odd = tl.load(src + 2 * i + 1).to(tl.float32)
    c_e, c_o = tl.load(cos_ptr + t * 2 * HALF + 2 * i), tl.load(cos_ptr + t * 2 * HALF + 2 * i + 1)
    s_e, s_o = tl.load(sin_ptr + t * 2 * HALF + 2 * i), tl.load(sin_ptr + t * 2 * HALF + 2 * i + 1)
    dst = out_ptr + pid.to(tl.int64) * 2 * HALF
    tl.store(dst + 2 * i, cast(even * c_e - odd * s_e, out_ptr.dtype.element_ty, INTERPRET))
    tl.store(dst + 2 * i + 1, cast(odd * c_o + even * s_o, out_ptr.dtype.element_ty, INTERPRET))


def rope_reads(head_dim: int) -> bool:
    """Whether the RoPE kernel takes this head dim: an even power of two (one program's arange over pairs)."""
    return head_dim >= 2 and head_dim & (head_dim - 1) == 0


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D] (any strides with a contiguous last dim), cos/sin [T, D] fp32 -> the rotated x
    (contiguous, x's dtype), as ``layers.apply_rope``."""
    b, heads, t, d = x.shape
    if not rope_reads(d):
        raise ValueError(f"the RoPE kernel needs an even power-of-two head dim, got {d}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    if cos.shape != (t, d) or sin.shape != (t, d):
        raise ValueError(f"cos/sin must be [{t}, {d}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    out = dispatch.empty((b, heads, t, d), x.dtype, x.device)
    if out.numel():
        _rope_kernel[(b * heads * t,)](x, cos, sin, out, heads, t, x.stride(0), x.stride(1), x.stride(2),
                                       HALF=d // 2, INTERPRET=INTERPRET, num_warps=1)
    return out
