"""Paddle's ``weight_quantize`` output layouts for per-channel int8 / int4 weights on sm75-sm90 GPUs: the bytes
FastDeploy's prequantized wint8 linears and wint4 experts hold (it sets them as stored, and its weight-only
GEMMs read them). Read from PaddlePaddle/Paddle paddle/phi/kernels/impl/weight_quantize_kernel_gpu_impl.h
(``weight_permute_kernel_wint8``, ``weight_permute_kernel_wint4``, ``weight_interval_kernel_wint4``,
``per_channel_quant_gpu_int4_col_pack``); sm70 (Volta) uses other layouts, not written here. Our own code,
checked against positions worked out by hand from those kernels (tests/test_fastdeploy_export.py).
"""

from __future__ import annotations

import torch


def _pair_offsets(k: int) -> torch.Tensor:
    """Where code (r, k) of a row pair (rows 2j + r) goes inside the pair's 2K stored bytes: inside each
    16-input block input i moves to 2*(i % 8) + i // 8, then 64-input chunks of the two rows alternate."""
    kk = torch.arange(k)
    pk = kk // 16 * 16 + 2 * (kk % 8) + (kk % 16) // 8
    base = pk % 64 + pk // 64 * 128
    return torch.cat([base, base + 64])


def _check_wint8(n: int, k: int) -> None:
    if k % 64 or n % 2:
        raise ValueError(f"the wint8 layout needs K % 64 == 0 and an even N, got N={n}, K={k}")


def wint8_layout(codes: torch.Tensor) -> torch.Tensor:
    """Signed int8 codes [N, K] (quantkit's orientation) -> FastDeploy's stored int8 [N, K] (bytes q + 128)."""
    n, k = codes.shape
    _check_wint8(n, k)
    src = (codes.to(torch.int16) + 128).to(torch.uint8).reshape(n // 2, 2 * k)
    out = torch.empty_like(src)
    out[:, _pair_offsets(k)] = src
    return out.view(torch.int8).reshape(n, k)


def wint8_codes(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of ``wint8_layout``: stored int8 [N, K] -> signed int8 codes [N, K]."""
    n, k = stored.shape
    _check_wint8(n, k)
    u = stored.contiguous().view(torch.uint8).reshape(n // 2, 2 * k)[:, _pair_offsets(k)]
    return (u.to(torch.int16) - 128).to(torch.int8).reshape(n, k)


def _quad_offsets(k: int) -> torch.Tensor:
    """wint4: where byte j (inputs 2j, 2j+1) of row 4g + r goes inside the 4-row group's 2K stored bytes: byte j
    of a 16-byte block moves to 4*(j % 4) + 2*((j % 8) // 4) + (j % 16) // 8, then 32-byte chunks of the
    four rows alternate."""
    j = torch.arange(k // 2)
    pk = j // 16 * 16 + (j % 16) // 8 + 4 * (j % 4) + 2 * ((j % 8) // 4)
    base = pk % 32 + pk // 32 * 128
    return torch.cat([base + 32 * r for r in range(4)])


def _check_wint4(n: int, k: int) -> None:
    if k % 64 or n % 4:
        raise ValueError(f"the wint4 layout needs K % 64 == 0 and N % 4 == 0, got N={n}, K={k}")


def wint4_layout(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes int8 [N, K] (in -8..7) -> FastDeploy's stored int8 [N/2, K]: two inputs per byte
    (2j low nibble), bytes permuted (``_quad_offsets``), then in every 4 bytes x0..x3 the nibbles regrouped
    as (lo x0 | lo x2), (lo x1 | lo x3), (hi x0 | hi x2), (hi x1 | hi x3), each nibble stored as q + 8."""
    n, k = codes.shape
    _check_wint4(n, k)
    nib = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).reshape(n // 4, 2 * k)
    x = torch.empty_like(packed)
    x[:, _quad_offsets(k)] = packed
    x = x.reshape(-1, 4)
    lo, hi = ((x & 0xF) + 8) & 0xF, ((x >> 4) + 8) & 0xF
    out = torch.stack([lo[:, 0] | lo[:, 2] << 4, lo[:, 1] | lo[:, 3] << 4, hi[:, 0] | hi[:, 2] << 4, hi[:, 1] | hi[:, 3] << 4], 1)
    return out.view(torch.int8).reshape(n // 2, k)


def wint4_codes(stored: torch.Tensor) -> torch.Tensor:
    """Inverse of ``wint4_layout``: stored int8 [N/2, K] -> signed codes int8 [N, K]."""
    n, k = stored.shape[0] * 2, stored.shape[1]
    _check_wint4(n, k)
    y = stored.contiguous().view(torch.uint8).reshape(-1, 4).to(torch.int16)
    lo = torch.stack([y[:, 0] & 0xF, y[:, 1] & 0xF, y[:, 0] >> 4, y[:, 1] >> 4], 1) - 8  # low nibbles of x0..x3
    hi = torch.stack([y[:, 2] & 0xF, y[:, 3] & 0xF, y[:, 2] >> 4, y[:, 3] >> 4], 1) - 8
    lo, hi = lo.reshape(n // 4, 2 * k)[:, _quad_offsets(k)], hi.reshape(n // 4, 2 * k)[:, _quad_offsets(k)]
    return torch.stack([lo.reshape(n, k // 2), hi.reshape(n, k // 2)], -1).reshape(n, k).to(torch.int8)
