"""Round-to-nearest onto a grouped integer grid, with an optional MSE-optimal clipping search.

Pure tensor functions over ``[.., N, K]`` weights (2-D linears and 3-D experts alike). The grid helpers
(``grid_for_range``, ``quantize_to_grid``) are shared with the other quantizers so every method lands
on the same grid and the same ``QTensor``.
"""

from __future__ import annotations

import torch

from quantkit.quant.qtensor import QTensor

CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.00, 0.95, ..., 0.50


def qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def grid_for_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool, scale_dtype: torch.dtype):
    """Scale (rounded to its storage dtype) and zero point for values in [lo, hi] (fp32, any shape).

    Symmetric: scale = max(|lo|, |hi|) / ((2^b - 1) / 2), no zero point (GPTQ's convention).
    Asymmetric: the range is widened to contain 0, scale = (hi - lo) / (2^b - 1) and
    zero = round(qmin - lo / scale), clamped to the code range.
    """
    qmin, qmax = qrange(bits)
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        scale = (amax / ((qmax - qmin) / 2)).clamp_min(1e-10).to(scale_dtype)
        return scale, None
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(1e-10).to(scale_dtype)
    zero = torch.round(qmin - lo / scale.float()).clamp(qmin, qmax)
    return scale, zero


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """w [..., g] fp32 with scale/zero [..., 1] -> integer codes (as fp32) in the code range."""
    qmin, qmax = qrange(bits)
    q = torch.round(w / scale.float())
    if zero is not None:
        q = q + zero
    return q.clamp(qmin, qmax)


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, *, clip_search: bool = False,
        scale_dtype: torch.dtype | None = None, clip_weight: torch.Tensor | None = None) -> QTensor:
    """Quantize w [.., N, K] group-wise along K (``group_size`` must divide K).

    ``clip_weight`` [.., K] (>= 0, e.g. diag of the input Hessian) weights each input column's squared
    error in the clipping search, so the grid fits the columns that matter for the output."""
    *lead, n, k = w.shape
    scale_dtype = scale_dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
    wg = w.float().reshape(*lead, n, k // group_size, group_size)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale, zero = grid_for_range(lo, hi, bits, symmetric, scale_dtype)
    if clip_search:
        cw = None if clip_weight is None else clip_weight.float().reshape(*clip_weight.shape[:-1], k // group_size, group_size)
        scale, zero = clip_grid(wg, lo, hi, bits, symmetric, scale_dtype, cw)
    q = quantize_to_grid(wg, scale, zero, bits)
    codes = q.reshape(*lead, n, k).to(torch.int8)
    zeros = None if zero is None else zero.squeeze(-1).to(torch.int8)
    return QTensor(codes, scale.squeeze(-1), zeros, bits, group_size)


def clip_grid(wg, lo, hi, bits, symmetric, scale_dtype, weight=None):
    """Per group, the shrink of [lo, hi] (from CLIP_RATIOS) whose grid gives the least (weighted) squared error."""
    best_err = best_scale = best_zero = None
    for r in CLIP_RATIOS:
        scale, zero = grid_for_range(lo * r, hi * r, bits, symmetric, scale_dtype)
        q = quantize_to_grid(wg, scale, zero, bits)
        deq = (q - (zero if zero is not None else 0)) * scale.float()
        err = (deq - wg).pow(2)
        err = (err if weight is None else err * weight).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero
