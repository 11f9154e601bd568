"""Triton dequant-GEMM for the 2-bit code (CCQ / FastDeploy WINT2, ``quantkit.format.wint2``).

The code is decoded in registers, per 64-input tile (one local-scale group): one fp32 FMA + floor per code
byte gives v, and each of its four weights is a 6-bit window of v (a shift and a mask); no lookup table.
The tile's integers go to the MMA exactly (|q| <= 32 is exact in bf16/fp16) and the fp32 product is scaled
by local * super_scale, so the weights are never rounded to bf16 (the twin rounds them once, as FastDeploy's
CUDA kernel does; the difference is that rounding, far inside the tests' tolerance).

Codes are read in their on-disk layout ``[K/4, N]`` (N contiguous, so a tile's rows load coalesced); any
column slice of it works too (e.g. the gate or up half of FastDeploy's fused ``up_gate_proj``).
"""

from __future__ import annotations

import torch

from quantkit.kernels.dense import Config, launch_linear
from quantkit.format.wint2 import check_k
from quantkit.kernels.reference import Code2Weight
from quantkit.kernels.tiles import KIND_CODE2


def code2_args(w: Code2Weight) -> tuple[tuple, tuple]:
    """(pointers a..e, row strides a..c) of a 2-bit-code weight (see ``tiles``)."""
    for t in (w.quant_weight, w.weight_scale, w.super_scales, w.code_scale, w.code_zp):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError("2-bit-code kernel tensors need a contiguous last dimension")
    if w.quant_weight.dtype != torch.uint8 or w.weight_scale.dtype != torch.uint8:
        raise ValueError("quant_weight and weight_scale must be uint8")
    check_k(w.k, "2-bit-code kernel")
    ptrs = (w.quant_weight, w.weight_scale, w.super_scales, w.code_scale, w.code_zp)
    return ptrs, (w.quant_weight.stride(-2), w.weight_scale.stride(-2), 0)


def code2_launch_args(w: Code2Weight, config: Config | None) -> tuple:
    """``launch_linear``'s weight arguments (kind .. bk) for a 2-bit-code weight."""
    if config is not None and config.bk != 64:
        raise ValueError("the 2-bit-code kernel works in 64-input tiles (bk=64)")
    ptrs, strides = code2_args(w)
    return KIND_CODE2, ptrs, strides, w.n, w.k, w.k // 4, 64, 2, False, 64


def code2_linear(x: torch.Tensor, w: Code2Weight, bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """x [.., K] -> x @ W (+ bias) [.., N] in x's dtype; the twin is ``reference.code2_linear``."""
    return launch_linear(x, *code2_launch_args(w, config), bias, config)
