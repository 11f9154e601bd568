"""Triton dequant-GEMM for dense layers: compressed-tensors int2/int4/int8 weights (grouped or per-channel,
symmetric or asymmetric) and, through ``code2.py``, the 2-bit code; bf16 / fp16 (and fp32) activations.

The kernels read the checkpoint's packed tensors as they are (no load-time repack; the format module says
why). One kernel covers both regimes; ``pick_config`` chooses its tiles from M:

* decode (M <= 16): 16 token columns (``tl.dot``'s minimum), 64 weight rows per program and **split-K**: the
  K tiles are cut into ``S`` contiguous ranges, one per program on grid axis 1, so that M = 1..16 still puts
  about two programs per SM on the GPU. Each split writes an fp32 partial ``[S, M, N]`` and counts itself in
  its tile's counter (an acquire-release atomic); the one that arrives last sums the S partials in split
  order (deterministic whatever the arrival order), writes the output and zeroes the counter: one launch,
  where a torch sum and cast after it cost two more. Scales are applied to the fp32 tile product (one
  multiply per output, not per weight).
* prefill (M > 16): larger token tiles, no split once the output tiles fill the GPU, scales applied to the
  weight tile before the MMA so the accumulator chains through it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from quantkit.kernels import dispatch
from quantkit.kernels.reference import IntWeight, TrellisWeight
from quantkit.kernels.tiles import KIND_INT, KIND_TRELLIS, column_params, dot_in_f32, cast, interpreted, tile_codes, tile_mma, tile_params


@dataclass(frozen=True)
class Config:
    bm: int  # tokens per program (the MMA's N side; >= 16)
    bn: int  # weight rows (output features) per program
    bk: int  # inputs per K tile (divides the scale group)
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    scale_in_tile: bool = False


@triton.jit
def _linear_kernel(x_ptr, out_ptr, part_ptr, count_ptr, a_ptr, b_ptr, c_ptr, d_ptr, e_ptr,
                   ua_ptr, ub_ptr, uc_ptr, ud_ptr, ue_ptr, M, N, K, KW, group_size,
                   stride_xm, stride_om, stride_ps, sra, srb, src,
                   KIND: tl.constexpr, BITS: tl.constexpr, ASYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   BK: tl.constexpr, SPLIT_K: tl.constexpr, GATE_UP: tl.constexpr, SCALE_IN_TILE: tl.constexpr,
                   DOT_F32: tl.constexpr, INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    pid_n = pid // num_m  # neighbouring programs share a weight tile (L2 reuse across token tiles)
    pid_m = pid % num_m
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_mask = offs_m < M
    k_tiles = tl.cdiv(K, BK)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt0 = tl.program_id(1) * per_split
    kt1 = tl.minimum(kt0 + per_split, k_tiles)
    first = tl.minimum(kt0, k_tiles - 1)
    sup, cs, zp = column_params(c_ptr, d_ptr, e_ptr, offs_n, n_mask, KIND)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    s_next, z_next = tile_params(b_ptr, c_ptr, srb, src, offs_n, n_mask, first, group_size, sup, KIND, BITS, ASYM, BK)
    if GATE_UP:  # a second weight of the same scheme (the up projection): silu(x G^T) * (x U^T) at the end
        u_sup, u_cs, u_zp = column_params(uc_ptr, ud_ptr, ue_ptr, offs_n, n_mask, KIND)
        acc_up = tl.zeros((BN, BM), dtype=tl.float32)
        us_next, uz_next = tile_params(ub_ptr, uc_ptr, srb, src, offs_n, n_mask, first, group_size, u_sup, KIND, BITS,
                                       ASYM, BK)
    for kt in range(kt0, kt1):
        nxt = tl.minimum(kt + 1, k_tiles - 1)
        s, z = s_next, z_next  # loaded an iteration ago; now the next tile's, while this one is decoded
        s_next, z_next = tile_params(b_ptr, c_ptr, srb, src, offs_n, n_mask, nxt, group_size, sup, KIND, BITS, ASYM, BK)
        q = tile_codes(a_ptr, sra, offs_n, n_mask, kt, KW, cs, zp, z, KIND, BITS, BN, BK)
        offs_k = kt * BK + tl.arange(0, BK)
        xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + offs_k[:, None],
                     mask=m_mask[None, :] & (offs_k[:, None] < K), other=0.0)
        acc = tile_mma(acc, q, s, xt, SCALE_IN_TILE, DOT_F32, INTERPRET)
        if GATE_UP:
            us, uz = us_next, uz_next
            us_next, uz_next = tile_params(ub_ptr, uc_ptr, srb, src, offs_n, n_mask, nxt, group_size, u_sup, KIND,
                                           BITS, ASYM, BK)
            q = tile_codes(ua_ptr, sra, offs_n, n_mask, kt, KW, u_cs, u_zp, uz, KIND, BITS, BN, BK)
            acc_up = tile_mma(acc_up, q, us, xt, SCALE_IN_TILE, DOT_F32, INTERPRET)
    mask = m_mask[None, :] & n_mask[:, None]
    out = out_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
    if SPLIT_K == 1:
        if GATE_UP:
            acc = acc * tl.sigmoid(acc) * acc_up
        tl.store(out, cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
    else:  # fp32 partials; the split that finishes its tile last sums them in split order and writes the output
        part = part_ptr + offs_m[None, :] * stride_om + offs_n[:, None]
        tl.store(part + tl.program_id(1) * stride_ps, acc, mask=mask)
        if GATE_UP:  # the up partials follow the gate ones: [2 * SPLIT_K, M, N]
            tl.store(part + (SPLIT_K + tl.program_id(1)) * stride_ps, acc_up, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the (one-thread) release below
        done = tl.atomic_add(count_ptr + pid, 1, sem="acq_rel")  # release: this partial; acquire: the others
        if done == SPLIT_K - 1:
            tl.debug_barrier()
            total = tl.zeros((BN, BM), dtype=tl.float32)
            for s in range(SPLIT_K):
                total += tl.load(part + s * stride_ps, mask=mask, other=0.0, cache_modifier=".cg")
            if GATE_UP:
                total_up = tl.zeros((BN, BM), dtype=tl.float32)
                for s in range(SPLIT_K):
                    total_up += tl.load(part + (SPLIT_K + s) * stride_ps, mask=mask, other=0.0, cache_modifier=".cg")
                total = total * tl.sigmoid(total) * total_up
            tl.store(out, cast(total, out_ptr.dtype.element_ty, INTERPRET), mask=mask)
            tl.atomic_xchg(count_ptr + pid, 0)  # the tile's counter is zero again for the next launch


INTERPRET = interpreted(_linear_kernel)  # how Triton built the kernel (TRITON_INTERPRET at import): its numerics


@functools.lru_cache(maxsize=4096)
def pick_config(m: int, n: int, k: int, bk: int, sms: int) -> Config:
    """Tiles for an [M, K] x [N, K]^T product on a GPU with ``sms`` SMs, ``bk`` the weight's K tile
    (``dispatch.tile_k``). Defaults; the GPU benchmarks are where they get tuned."""
    if m <= 16:
        bm, bn, warps, stages, in_tile = 16, 64, 4, 4, False
    elif m <= 64:
        bm, bn, warps, stages, in_tile = 32 if m <= 32 else 64, 64, 4, 4, False
    else:
        bm, bn, warps, stages, in_tile = 64, 128, 8, 3, True
        bk = min(bk, 64)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    k_tiles = triton.cdiv(k, bk)
    split = max(1, min(k_tiles // 2, (2 * sms) // tiles)) if tiles < sms else 1
    return Config(bm, bn, bk, split, warps, stages, in_tile)


def launch_linear(x: torch.Tensor, kind: int, ptrs: tuple, strides: tuple, n: int, k: int, kw: int, group_size: int,
                  bits: int, asym: bool, bk: int, bias: torch.Tensor | None, config: Config | None,
                  up_ptrs: tuple | None = None) -> torch.Tensor:
    """x [.., K] -> [.., N] through ``_linear_kernel``; ptrs (a..e) and row strides (a..c) as in ``tiles``,
    ``bk`` the weight's K tile (``dispatch.tile_k``). With ``up_ptrs`` (a second weight with the same scheme,
    shape and strides): silu(x @ W^T) * (x @ U^T)."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0:
        return x.new_zeros(*lead, n)
    cfg = config or pick_config(m, n, k, bk, dispatch.sm_count(x.device))
    tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
    y = dispatch.empty((m, n), x.dtype, x.device)
    part, counts = y, y  # unused without a split
    if cfg.split_k > 1:
        part = dispatch.empty((cfg.split_k * (1 if up_ptrs is None else 2), m, n), torch.float32, x.device)
        counts = dispatch.split_counters(x.device, tiles)
    _linear_kernel[(tiles, cfg.split_k)](x2, y, part, counts, *ptrs, *(up_ptrs or ptrs), m, n, k, kw, group_size,
                                         x2.stride(0), n, m * n, *strides, KIND=kind, BITS=bits, ASYM=asym, BM=cfg.bm,
                                         BN=cfg.bn, BK=cfg.bk, SPLIT_K=cfg.split_k, GATE_UP=up_ptrs is not None,
                                         SCALE_IN_TILE=cfg.scale_in_tile, DOT_F32=dot_in_f32(x.dtype, INTERPRET),
                                         INTERPRET=INTERPRET, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*lead, n)


def int_args(w: IntWeight) -> tuple[tuple, tuple]:
    """(pointers a..e, row strides a..c) of an int weight; a missing zero point passes the scales (unused)."""
    for t in (w.packed, w.scale) + (() if w.zero is None else (w.zero,)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError("int kernel tensors need a contiguous last dimension")
    zero = w.scale if w.zero is None else w.zero
    return (w.packed, w.scale, zero, w.scale, w.scale), (w.packed.stride(-2), w.scale.stride(-2), zero.stride(-2))


def _int_launch_args(w: IntWeight, config: Config | None) -> tuple:
    """``launch_linear``'s weight arguments (kind .. bk) for an int weight, after checking the kernel reads it."""
    bk = dispatch.tile_k(w)
    if not bk:
        raise ValueError(f"the int kernel reads 2/4/8-bit weights whose group has a power-of-two divisor >= 16, got "
                         f"{w.bits}-bit, group {w.group_size}")
    if config is not None and w.group_size != w.k and w.group_size % config.bk:
        raise ValueError(f"K tile {config.bk} straddles groups of {w.group_size}")
    ptrs, strides = int_args(w)
    return KIND_INT, ptrs, strides, w.n, w.k, w.packed.shape[-1], w.group_size, w.bits, w.zero is not None, bk


def int_linear(x: torch.Tensor, w: IntWeight, bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
    """x [.., K] -> x @ W^T (+ bias) [.., N] in x's dtype; the twin is ``reference.int_linear``."""
    return launch_linear(x, *_int_launch_args(w, config), bias, config)


def launch_args(w, config: Config | None = None) -> tuple:
    """(kind, pointers, row strides, n, k, KW, group, bits, asym, bk) of an int or 2-bit-code weight (one, or
    E stacked): what the dense and fused-MoE launches pass for it."""
    if isinstance(w, IntWeight):
        return _int_launch_args(w, config)
    if isinstance(w, TrellisWeight):
        from quantkit.kernels.trellis import trellis_launch_args

        return trellis_launch_args(w, config)
    from quantkit.kernels.code2 import code2_launch_args

    return code2_launch_args(w, config)


def paired(a: tuple, b: tuple) -> bool:
    """Whether two weights' ``launch_args`` can share one launch (gate and up): all but the pointers equal, and
    not the trellis code (its SiLU comes after the output Hadamard, outside the GEMM)."""
    return a[0] == b[0] and a[2:] == b[2:] and a[0] != KIND_TRELLIS


def gate_up(x: torch.Tensor, gate, up, config: Config | None = None) -> torch.Tensor | None:
    """silu(x @ G^T) * (x @ U^T) [.., N] in one launch, for two int or two 2-bit-code weights of one scheme,
    shape and strides (a SwiGLU MLP's gate and up projections); None when they are not such a pair (the caller
    runs them apart). The twin is ``reference.gate_up``."""
    g, u = launch_args(gate, config), launch_args(up, config)
    if not paired(g, u):
        return None
    return launch_linear(x, *g, None, config, up_ptrs=u[1])
