"""RMSNorm and RoPE (interleaved as ERNIE, or rotate-half as GPT-NeoX, optionally partial as GLM) as one Triton
launch each; the twins are ``layers.rms_norm`` and ``layers.apply_rope`` (interleaved; the rotate-half and
partial variants are tested against a float64 reference of transformers' ``rotate_half``). Per-head q/k
RMSNorm (Qwen3) is ``rms_norm`` on the [B, heads, T, D] tensor: it normalises over the last dim.

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
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, HEADS, T, sb, sh, st, HALF: tl.constexpr, D: tl.constexpr,
                 ROTATE_HALF: tl.constexpr, PASS: tl.constexpr, PASS_P: tl.constexpr, INTERPRET: tl.constexpr):
    """One program per (batch, head, token) row of D values: the first ``2 * HALF`` rotate in pairs (2i, 2i+1)
    (interleaved) or (i, i + HALF) (``ROTATE_HALF``), the ``PASS`` after them are copied."""
    pid = tl.program_id(0)
    t = pid % T
    bh = pid // T
    src = x_ptr + (bh // HEADS).to(tl.int64) * sb + (bh % HEADS) * sh + t * st
    i = tl.arange(0, HALF)
    if ROTATE_HALF:
        ia, ib = i, i + HALF
    else:
        ia, ib = 2 * i, 2 * i + 1
    a = tl.load(src + ia).to(tl.float32)
    b = tl.load(src + ib).to(tl.float32)
    c_a, c_b = tl.load(cos_ptr + t * 2 * HALF + ia), tl.load(cos_ptr + t * 2 * HALF + ib)
    s_a, s_b = tl.load(sin_ptr + t * 2 * HALF + ia), tl.load(sin_ptr + t * 2 * HALF + ib)
    dst = out_ptr + pid.to(tl.int64) * D
    tl.store(dst + ia, cast(a * c_a - b * s_a, out_ptr.dtype.element_ty, INTERPRET))
    tl.store(dst + ib, cast(b * c_b + a * s_b, out_ptr.dtype.element_ty, INTERPRET))
    if PASS > 0:  # partial rotary: the rest of the head passes through unchanged
        j = tl.arange(0, PASS_P)
        keep = tl.load(src + 2 * HALF + j, mask=j < PASS)
        tl.store(dst + 2 * HALF + j, keep.to(out_ptr.dtype.element_ty), mask=j < PASS)


STYLES = ("interleaved", "half")


def rope_reads(head_dim: int, rotary_dim: int | None = None) -> bool:
    """Whether the RoPE kernel takes this head dim and rotary dim (default: the whole head): the rotated part
    a power of two of at least 2 (one program's arange over pairs), no wider than the head."""
    r = head_dim if rotary_dim is None else rotary_dim
    return 2 <= r <= head_dim and r & (r - 1) == 0


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "interleaved",
         rotary_dim: int | None = None) -> torch.Tensor:
    """x [B, heads, T, D] (any strides with a contiguous last dim), cos/sin [T, R] fp32 -> the rotated x
    (contiguous, x's dtype). ``style`` 'interleaved' (ERNIE, GPT-J: pairs (2i, 2i+1), as ``layers.apply_rope``)
    or 'half' (GPT-NeoX, Qwen, Mixtral, GLM: pairs (i, i + R/2), transformers' ``rotate_half``); only the first
    ``rotary_dim`` = R (default D) of each head rotate, the rest pass through (GLM: R = D/2)."""
    b, heads, t, d = x.shape
    r = d if rotary_dim is None else rotary_dim
    if style not in STYLES:
        raise ValueError(f"RoPE style {style!r} is not one of {', '.join(STYLES)}")
    if not rope_reads(d, r):
        raise ValueError(f"the RoPE kernel needs an even power-of-two head dim (or rotary dim <= head dim), got "
                         f"head dim {d}, rotary dim {r}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    if cos.shape != (t, r) or sin.shape != (t, r):
        raise ValueError(f"cos/sin must be [{t}, {r}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    out = dispatch.empty((b, heads, t, d), x.dtype, x.device)
    if out.numel():
        _rope_kernel[(b * heads * t,)](x, cos, sin, out, heads, t, x.stride(0), x.stride(1), x.stride(2),
                                       HALF=r // 2, D=d, ROTATE_HALF=style == "half", PASS=d - r,
                                       PASS_P=triton.next_power_of_2(max(d - r, 1)), INTERPRET=INTERPRET,
                                       num_warps=1)
    return out
