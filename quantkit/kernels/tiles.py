"""Triton building blocks shared by the dense and fused-MoE kernels: weight tiles decoded in registers, and
the tile product.

Every kernel works in the swapped orientation ``acc[BN, BM] += W_tile[BN, BK] @ x_tile^T[BK, BM]``: the
weight rows (output features) are the MMA's M side and the few tokens of a decode step its N side, so a
decode step pads tokens to 16 (the smallest ``tl.dot`` side) instead of 64 and the decoded weight tile
stays in the row-major layout it was unpacked in (no transpose).

A weight is passed as five pointers and three row strides whose meaning depends on ``KIND``:

    KIND_INT   a: packed int32 [N, KW] (LSB-first fields along K)   b: scale [N, K/g]   c: zero int32 [ceil(N*b/32), K/g]
    KIND_CODE2 a: quant_weight uint8 [K/4, N]   b: weight_scale uint8 [ceil(K/128), N]
               c: super_scales [N]   d: code_scale fp32 [N]   e: code_zp fp32 [N]
    KIND_TRELLIS a: trellis int32 [N/16, K/16, 8*BITS] (row stride: the N/16 axis)   b..e unused
               ``KW`` carries the state bits L; the tile is Q, the integer values (no scale: the
               Hadamards and suh/svh are applied to the activations, ``kernels/trellis.py``)

The last dimension of every tensor is contiguous. A K-tile is ``tile_codes``: exact integers in fp32 (codes
minus zero point, or the 2-bit code's windows), with ``tile_params``: a per-row scale (and zero point) for the
whole tile, which the kernels load one tile ahead. A tile never straddles a scale group (``BK`` divides the
group size, or the weight has one group per row).
"""

from __future__ import annotations

import triton
import triton.language as tl

KIND_INT = 0
KIND_CODE2 = 1
KIND_TRELLIS = 2


@triton.jit
def column_params(c_ptr, d_ptr, e_ptr, offs_n, n_mask, KIND: tl.constexpr):
    """Per-output-row parameters read once per program: (super_scale, code_scale, code_zp) for the 2-bit code."""
    if KIND == 1:
        sup = tl.load(c_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        cs = tl.load(d_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zp = tl.load(e_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    else:
        sup = offs_n.to(tl.float32) * 0.0  # unused by int tiles
        cs = sup
        zp = sup
    return sup, cs, zp


@triton.jit
def _field(words, shift: tl.constexpr, BITS: tl.constexpr):
    return (words >> shift) & ((1 << BITS) - 1)  # arithmetic shift, then mask: the unsigned field


@triton.jit
def _fields4(words, base: tl.constexpr, step: tl.constexpr, BITS: tl.constexpr):
    """The fields at bit offsets base + step * (0, 1, 2, 3), interleaved in that order along the last dim."""
    even = tl.interleave(_field(words, base, BITS), _field(words, base + 2 * step, BITS))
    odd = tl.interleave(_field(words, base + step, BITS), _field(words, base + 3 * step, BITS))
    return tl.interleave(even, odd)


@triton.jit
def _fields8(words, base: tl.constexpr, step: tl.constexpr, BITS: tl.constexpr):
    return tl.interleave(_fields4(words, base, 2 * step, BITS), _fields4(words, base + step, 2 * step, BITS))


@triton.jit
def unpack_fields(words, BITS: tl.constexpr):
    """int32 words [R, W] -> their 32/BITS fields [R, W * 32/BITS], field j of word w at w * 32/BITS + j.

    Built with ``tl.interleave`` so that a word's fields stay in the registers of the thread that loaded it (a
    3-D broadcast + reshape lets the compiler spread them over threads instead, at a large register cost)."""
    if BITS == 8:
        return _fields4(words, 0, 8, BITS)
    elif BITS == 4:
        return _fields8(words, 0, 4, BITS)
    else:
        return tl.interleave(_fields8(words, 0, 4, BITS), _fields8(words, 2, 4, BITS))


@triton.jit
def tile_params(b_ptr, c_ptr, srb, src, offs_n, n_mask, kt, group_size, sup,
                KIND: tl.constexpr, BITS: tl.constexpr, ASYM: tl.constexpr, BK: tl.constexpr):
    """(scale fp32 [BN], zero point int32 [BN]) of K-tile ``kt``: the int weight's group scale and zero point
    (2^(b-1) when symmetric), or the 2-bit code's local * super scale (zero unused). These are a few bytes
    per row, too small and scattered for Triton's pipeliner to stage in shared memory, so the kernels load
    them one tile ahead (carried to the next iteration) instead of waiting on them in every iteration."""
    if KIND == 1:
        packed = tl.load(b_ptr + (kt // 2) * srb + offs_n, mask=n_mask, other=0).to(tl.int32)
        local = (packed >> (4 * (1 - kt % 2))) & 0xF  # the even 64-group sits in the high nibble
        return local.to(tl.float32) * sup, offs_n * 0
    elif KIND == 2:  # the trellis tile is scale-free
        return offs_n.to(tl.float32) * 0.0 + 1.0, offs_n * 0
    else:
        PER: tl.constexpr = 32 // BITS
        grp = (kt * BK) // group_size
        s = tl.load(b_ptr + offs_n * srb + grp, mask=n_mask, other=0.0).to(tl.float32)
        if ASYM:
            zw = tl.load(c_ptr + (offs_n // PER) * src + grp, mask=n_mask, other=0)
            z = (zw >> ((offs_n % PER) * BITS)) & ((1 << BITS) - 1)  # zero points are packed like codes, along N
        else:
            z = offs_n * 0 + (1 << (BITS - 1))
        return s, z


@triton.jit
def tile_codes(a_ptr, sra, offs_n, n_mask, kt, KW, cs, zp, z,
               KIND: tl.constexpr, BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """K-tile ``kt`` of the weight as exact integers in fp32 [BN, BK]: int codes minus the zero point ``z``,
    or the 2-bit code decoded in registers (no lookup table): v = floor(fma(c, code_scale, code_zp) + 0.5),
    q_i = ((v >> (9 - 3i)) & 0x3F) - 32 is input 4r + i."""
    if KIND == 1:
        offs_r = kt * 16 + tl.arange(0, 16)
        c = tl.load(a_ptr + offs_r[None, :] * sra + offs_n[:, None], mask=n_mask[:, None], other=0)  # [BN, 16]
        v = tl.floor(tl.fma(c.to(tl.float32), cs[:, None], zp[:, None]) + 0.5).to(tl.int32)  # FastDeploy's FMA
        # The four windows of a byte stay in the thread that decoded it (interleave adds a register dimension;
        # a 3-D broadcast + reshape instead spreads the byte's rows over threads, and every thread then holds
        # the code_scale/code_zp of 32 columns: 255 registers for gate_up on sm_90).
        a = tl.interleave((v >> 9) & 0x3F, (v >> 3) & 0x3F)  # windows 0 and 2 of byte r at 2r, 2r + 1
        b = tl.interleave((v >> 6) & 0x3F, v & 0x3F)  # windows 1 and 3
        q = tl.interleave(a, b) - 32  # [BN, 64]: window i of byte r at 4r + i
    elif KIND == 2:
        q = trellis_values(a_ptr, sra, offs_n, n_mask, kt, KW, BITS, BN, BK)
    else:
        PER: tl.constexpr = 32 // BITS
        BKW: tl.constexpr = BK // PER
        offs_kw = kt * BKW + tl.arange(0, BKW)
        words = tl.load(a_ptr + offs_n[:, None] * sra + offs_kw[None, :],
                        mask=n_mask[:, None] & (offs_kw[None, :] < KW), other=0)
        q = unpack_fields(words, BITS) - z[:, None]  # field j of word kw at kw*PER + j: the stream order along K
    return q.to(tl.float32)


@triton.jit
def trellis_values(a_ptr, sra, offs_n, n_mask, kt, L, BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """K-tile ``kt`` of a trellis weight's integer values Q [BN, BK] (int32), decoded in registers: weight
    (n, k) is t = 16 (n % 16) + k % 16 of tile (n // 16, k // 16); its state is the L-bit window of the
    tile's MSB-first stream ending at bit (t + 1) BITS, read from two words; value = bytesum(MUL1 * s) - 510."""
    W: tl.constexpr = 8 * BITS  # words per tile
    if BITS == 2:  # row r of a tile is word r: one load per (row, tile) of the word and of its predecessor
        NT: tl.constexpr = BK // 16
        r = offs_n % 16
        base = a_ptr + (offs_n // 16)[:, None] * sra + (kt * NT + tl.arange(0, NT))[None, :] * W  # [BN, NT]
        lo = tl.load(base + r[:, None], mask=n_mask[:, None], other=0).to(tl.uint32, bitcast=True)
        hi = tl.load(base + ((r + 15) % 16)[:, None], mask=n_mask[:, None], other=0).to(tl.uint32, bitcast=True)
        sh = (30 - 2 * tl.arange(0, 16)).to(tl.uint32)[None, None, :]  # weight c ends at bit 2c + 1 of word r
        s = (lo[:, :, None] >> sh) | ((hi[:, :, None] << 1) << (31 - sh))
        s = tl.reshape(s & ((1 << L) - 1).to(tl.uint32), (BN, BK))
    else:
        s = _trellis_states(a_ptr, sra, offs_n, n_mask, kt, L, BITS, BK)
    x = s * 0x83DCD12D  # MUL1 mod 2^32 (uint32; ``format.trellis.MUL1``, the tests hold the two bit-exact)
    v = (x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24)
    return v.to(tl.int32) - 510


@triton.jit
def _trellis_states(a_ptr, sra, offs_n, n_mask, kt, L, BITS: tl.constexpr, BK: tl.constexpr):
    """States [BN, BK] uint32 for any BITS: each weight's two words gathered, then a funnel shift."""
    W: tl.constexpr = 8 * BITS
    offs_k = kt * BK + tl.arange(0, BK)
    t = (offs_n[:, None] % 16) * 16 + offs_k[None, :] % 16
    end = (t + 1) * BITS - 1
    w = end // 32
    base = a_ptr + (offs_n[:, None] // 16) * sra + (offs_k[None, :] // 16) * W
    lo = tl.load(base + w, mask=n_mask[:, None], other=0).to(tl.uint32, bitcast=True)
    hi = tl.load(base + (w + W - 1) % W, mask=n_mask[:, None], other=0).to(tl.uint32, bitcast=True)
    sh = (31 - end % 32).to(tl.uint32)
    # 32-bit funnel shift (hi:lo) >> sh; hi is shifted in two steps so no shift reaches 32 bits
    return ((lo >> sh) | ((hi << 1) << (31 - sh))) & ((1 << L) - 1).to(tl.uint32)


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> ``dtype``, rounding to nearest even. Triton's interpreter truncates fp32 -> bf16, so there the
    rounding is done by hand first (then the cast is exact): the CPU tests see the GPU's numerics."""
    if INTERPRET and dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
        x = b.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tile_mma(acc, q, s, xt, SCALE_IN_TILE: tl.constexpr, DOT_F32: tl.constexpr, INTERPRET: tl.constexpr):
    """acc [BN, BM] += (q * s[:, None]) @ xt, q [BN, BK] exact integers (fp32), xt [BK, BM] activations.

    SCALE_IN_TILE scales the tile before the product (the weights the torch twin builds, rounded to the
    activation dtype; the accumulator is chained through the MMA); otherwise the integers go to the MMA
    exactly and the fp32 product is scaled (one multiply per output instead of one per weight).
    DOT_F32 multiplies in fp32 (fp32 activations, and Triton's interpreter, which has no bf16 dot)."""
    if DOT_F32:
        if SCALE_IN_TILE:
            w = q * s[:, None]
            if xt.dtype != tl.float32:
                w = cast(w, xt.dtype, INTERPRET).to(tl.float32)  # the rounding the twin's weights get
            acc = tl.dot(w, xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc += tl.dot(q, xt.to(tl.float32), input_precision="ieee") * s[:, None]
    else:
        if SCALE_IN_TILE:
            acc = tl.dot((q * s[:, None]).to(xt.dtype), xt, acc)
        else:
            acc += tl.dot(q.to(xt.dtype), xt) * s[:, None]
    return acc


def dot_in_f32(dtype, interpreting: bool) -> bool:
    return interpreting or str(dtype) == "torch.float32"


def interpreted(kernel) -> bool:
    """Whether ``kernel`` runs in Triton's CPU interpreter (decided by TRITON_INTERPRET when it was defined)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)
