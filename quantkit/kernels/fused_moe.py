"""Fused MoE in Triton for int (compressed-tensors) and 2-bit-code expert weights.

    route (the caller) -> align -> gate_up launch -> down launch -> combine

* **align** (no host sync, so a CUDA graph can hold it): the T*k (token, slot) pairs are sorted by expert
  (stable) and each expert's run is padded to a multiple of ``BM``; ``rows`` lists pair ids block by block
  (padding = P, the pair count) and ``block_expert`` names each block's expert (E past the end: the program
  exits). Capacity is the worst case, P + min(E, P)*(BM-1) rounded up, so shapes never depend on routing.
  Up to 512 pairs it is one single-program launch; past that, torch ops. With one or two tokens (decode)
  every pair is its own block and the kernels read the top-k ids as the blocks' experts (``PAIR_BLOCKS``):
  no sort and no launch.
* **gate_up**: one launch over (block, N tile): each program gathers its tokens' rows of x, decodes the gate
  and the up tile of its expert in registers, accumulates both, and writes h = silu(gate)*up for each pair.
* **down**: one launch over (block, N tile): rows of h, times the pair's routing weight, written per pair
  in fp32.
* **combine**: one launch, out[t] = Σ_slot y[t, slot] (+ the shared experts' output) in fp32, then the
  activation dtype.

No split-K here (the SiLU needs whole sums, and six experts x 24..40 tiles already give the GPU a few hundred
programs at decode).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from quantkit.kernels import dispatch, reference
from quantkit.kernels.dense import Config, launch_args, paired
from quantkit.kernels.reference import IntWeight
from quantkit.kernels.tiles import cast, column_params, dot_in_f32, interpreted, tile_codes, tile_mma, tile_params

PAIR_BLOCK_TOKENS = 2  # up to this many tokens, every (token, expert) pair is its own block (no sort)
# Up to this many pairs the align kernel (one program, a few chunks) replaces ~20 torch launches; past it the
# torch ops (parallel sort) cost less than one program's serial walk, and the launches are amortized.
ALIGN_KERNEL_PAIRS = 512


@triton.jit
def _moe_kernel(x_ptr, out_ptr, rows_ptr, block_expert_ptr, rw_ptr,
                ga, gb, gc, gd, ge, ua, ub, uc, ud, ue,
                N, K, KW, group_size, P, E, stride_xm, stride_om,
                sea, seb, sec, sed, see, sra, srb, src,
                ROW_DIV: tl.constexpr, GATE_UP: tl.constexpr, PAIR_BLOCKS: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
                ASYM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                SCALE_IN_TILE: tl.constexpr, DOT_F32: tl.constexpr,
                INTERPRET: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    blk = pid // num_n
    pid_n = pid % num_n
    e = tl.load(block_expert_ptr + blk)
    if PAIR_BLOCKS:  # decode: block b is pair b alone (block_expert = the flat top-k ids, no rows array)
        rows = blk + tl.arange(0, BM) * 0
        m_mask = tl.arange(0, BM) == 0
    else:
        if e >= E:
            return
        rows = tl.load(rows_ptr + blk * BM + tl.arange(0, BM))  # pair ids; P marks padding
        m_mask = rows < P
    x_rows = rows // ROW_DIV  # gate_up reads token rows of x, down reads pair rows of h
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    e = e.to(tl.int64)
    ga, gb, gc, gd, ge = ga + e * sea, gb + e * seb, gc + e * sec, gd + e * sed, ge + e * see
    g_sup, g_cs, g_zp = column_params(gc, gd, ge, offs_n, n_mask, KIND)
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    if GATE_UP:
        ua, ub, uc, ud, ue = ua + e * sea, ub + e * seb, uc + e * sec, ud + e * sed, ue + e * see
        u_sup, u_cs, u_zp = column_params(uc, ud, ue, offs_n, n_mask, KIND)
        acc_up = tl.zeros((BN, BM), dtype=tl.float32)
    k_tiles = tl.cdiv(K, BK)
    gs_next, gz_next = tile_params(gb, gc, srb, src, offs_n, n_mask, 0, group_size, g_sup, KIND, BITS, ASYM, BK)
    if GATE_UP:
        us_next, uz_next = tile_params(ub, uc, srb, src, offs_n, n_mask, 0, group_size, u_sup, KIND, BITS, ASYM, BK)
    for kt in range(0, k_tiles):
        nxt = tl.minimum(kt + 1, k_tiles - 1)  # scales are loaded one tile ahead (see tiles.tile_params)
        gs, gz = gs_next, gz_next
        gs_next, gz_next = tile_params(gb, gc, srb, src, offs_n, n_mask, nxt, group_size, g_sup, KIND, BITS, ASYM, BK)
        offs_k = kt * BK + tl.arange(0, BK)
        xt = tl.load(x_ptr + x_rows[None, :] * stride_xm + offs_k[:, None],
                     mask=m_mask[None, :] & (offs_k[:, None] < K), other=0.0)
        q = tile_codes(ga, sra, offs_n, n_mask, kt, KW, g_cs, g_zp, gz, KIND, BITS, BN, BK)
        acc = tile_mma(acc, q, gs, xt, SCALE_IN_TILE, DOT_F32, INTERPRET)
        if GATE_UP:
            us, uz = us_next, uz_next
            us_next, uz_next = tile_params(ub, uc, srb, src, offs_n, n_mask, nxt, group_size, u_sup, KIND, BITS,
                                           ASYM, BK)
            q = tile_codes(ua, sra, offs_n, n_mask, kt, KW, u_cs, u_zp, uz, KIND, BITS, BN, BK)
            acc_up = tile_mma(acc_up, q, us, xt, SCALE_IN_TILE, DOT_F32, INTERPRET)
    if GATE_UP:
        acc = acc * tl.sigmoid(acc) * acc_up
    else:
        acc = acc * tl.load(rw_ptr + rows, mask=m_mask, other=0.0)[None, :]
    out = out_ptr + rows[None, :] * stride_om + offs_n[:, None]
    tl.store(out, cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=m_mask[None, :] & n_mask[:, None])


@triton.jit
def _combine_kernel(y_ptr, add_ptr, out_ptr, H, S: tl.constexpr, HAS_ADD: tl.constexpr, BH: tl.constexpr,
                    INTERPRET: tl.constexpr):
    """out[t] = Σ_s y[t, s] (+ add[t]) in fp32, cast once: one launch instead of sum, cast and add."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BH + tl.arange(0, BH)
    mask = offs < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for s in tl.static_range(S):
        acc += tl.load(y_ptr + (t * S + s) * H + offs, mask=mask, other=0.0)
    if HAS_ADD:
        acc += tl.load(add_ptr + t * H + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + offs, cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=mask)


INTERPRET = interpreted(_moe_kernel)


@triton.jit
def _align_kernel(ids_ptr, rows_ptr, block_expert_ptr, P, E, BLOCKS, BM: tl.constexpr, BE: tl.constexpr,
                  CH: tl.constexpr, BB: tl.constexpr):
    """One program: count pairs per expert (one-hot sums over chunks of ``CH`` pairs), pad each expert's run to
    ``BM``, name each block's expert, then place every pair at its expert's start + its rank among that
    expert's pairs so far (a cumulative sum of the one-hot tile): the stable order of ``reference.align``."""
    offs_e = tl.arange(0, BE)
    e_valid = offs_e < E
    counts = tl.zeros((BE,), dtype=tl.int32)
    for c0 in range(0, P, CH):
        offs = c0 + tl.arange(0, CH)
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1).to(tl.int32)
        counts += tl.sum((ids[:, None] == offs_e[None, :]).to(tl.int32), axis=0)
    padded = (counts + BM - 1) // BM * BM
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    for b0 in range(0, BLOCKS, BB):
        offs_b = b0 + tl.arange(0, BB)
        past = (ends[None, :] <= offs_b[:, None] * BM) & e_valid[None, :]  # experts whose run ends before b
        tl.store(block_expert_ptr + offs_b, tl.sum(past.to(tl.int32), axis=1), mask=offs_b < BLOCKS)
    for r0 in range(0, BLOCKS * BM, CH):
        offs = r0 + tl.arange(0, CH)
        tl.store(rows_ptr + offs, tl.zeros((CH,), dtype=tl.int32) + P, mask=offs < BLOCKS * BM)
    tl.debug_barrier()  # the padding is written before any thread places a pair over it
    seen = tl.zeros((BE,), dtype=tl.int32)
    for c0 in range(0, P, CH):
        offs = c0 + tl.arange(0, CH)
        ids = tl.load(ids_ptr + offs, mask=offs < P, other=-1).to(tl.int32)
        onehot = (ids[:, None] == offs_e[None, :]).to(tl.int32)
        rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
        base = tl.sum(onehot * (starts + seen)[None, :], axis=1)
        tl.store(rows_ptr + base + rank, offs, mask=offs < P)
        seen += tl.sum(onehot, axis=0)


def align(topk_ids: torch.Tensor, num_experts: int, bm: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(rows int32 [blocks*bm], block_expert int32 [blocks]): pairs grouped by expert in blocks of ``bm``, in one
    launch up to ``ALIGN_KERNEL_PAIRS`` pairs, else by ``reference.align`` (the twin, layout for layout). Up to
    ``PAIR_BLOCK_TOKENS`` tokens: (None, the flat top-k ids), one block per pair (no launch at all)."""
    flat = topk_ids.reshape(-1)
    if topk_ids.shape[0] <= PAIR_BLOCK_TOKENS:
        return None, flat
    p = flat.numel()
    blocks = align_blocks(p, num_experts, bm)
    if p > ALIGN_KERNEL_PAIRS:
        return reference.align(flat, num_experts, bm, blocks)
    rows = dispatch.empty((blocks * bm,), torch.int32, flat.device)
    block_expert = dispatch.empty((blocks,), torch.int32, flat.device)
    _align_kernel[(1,)](flat, rows, block_expert, p, num_experts, blocks, BM=bm,
                        BE=max(16, triton.next_power_of_2(num_experts)), CH=128, BB=64, num_warps=4)
    return rows, block_expert


def align_blocks(pairs: int, num_experts: int, bm: int) -> int:
    """Blocks for the worst case: every expert that can have pairs pads its run by up to bm - 1 rows."""
    return triton.cdiv(pairs + min(num_experts, pairs) * (bm - 1), bm)


@functools.lru_cache(maxsize=4096)
def moe_config(tokens: int, top_k: int, num_experts: int, n: int, bk: int) -> Config:
    """Block sizes from the average pairs per expert (defaults; tuned by the GPU benchmarks)."""
    avg = tokens * top_k / num_experts
    if tokens <= PAIR_BLOCK_TOKENS or avg <= 16:
        return Config(16, 64 if n >= 1024 else 32, bk, 1, 4, 4, False)
    if avg <= 48:
        return Config(32, 64, bk, 1, 4, 4, False)
    return Config(64, 128, min(bk, 64), 1, 8, 3, True)


def _launch(x, out, rows, block_expert, rw, first, second, top_k: int, gate_up: bool, cfg: Config, p: int, e: int):
    args = launch_args(first)
    kind, ptrs, rs, n, k, kw, group, bits, asym, _ = args
    es = tuple(t.stride(0) for t in ptrs)  # expert strides of the stacked tensors
    uptrs = ptrs
    if gate_up:
        up = launch_args(second)
        uptrs = up[1]
        if not paired(args, up) or tuple(t.stride(0) for t in uptrs) != es:
            raise ValueError("gate and up weights must share scheme and strides")
    grid = (block_expert.numel() * triton.cdiv(n, cfg.bn),)
    pair_blocks = rows is None
    _moe_kernel[grid](x, out, block_expert if pair_blocks else rows, block_expert, rw, *ptrs, *uptrs, n, k, kw, group,
                      p, e, x.stride(0), out.stride(0), *es, *rs, ROW_DIV=top_k if gate_up else 1, GATE_UP=gate_up,
                      PAIR_BLOCKS=pair_blocks, KIND=kind, BITS=bits, ASYM=asym,
                      BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, SCALE_IN_TILE=cfg.scale_in_tile,
                      DOT_F32=dot_in_f32(x.dtype, INTERPRET), INTERPRET=INTERPRET,
                      num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate, up, down,
              configs: tuple[Config, Config] | None = None, add: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], topk_ids / topk_weights [T, k] -> Σ_k w · down(silu(gate(x)) · up(x)) (+ ``add``, e.g. the
    shared experts' output) [T, H], with stacked [E, ...] ``IntWeight`` / ``Code2Weight`` experts (gate and up
    of one kind); twin: ``reference.fused_moe``."""
    t, hdim = x.shape
    top_k = topk_ids.shape[1]
    num_experts = gate.packed.shape[0] if isinstance(gate, IntWeight) else gate.quant_weight.shape[0]
    if add is not None and add.shape != x.shape:
        raise ValueError(f"add must have x's shape {tuple(x.shape)}, got {tuple(add.shape)}")
    if t == 0:
        return torch.zeros_like(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    inter, p = gate.n, t * top_k
    bk_gate, bk_up, bk_down = (dispatch.tile_k(w) for w in (gate, up, down))
    if not (bk_gate and bk_up and bk_down):
        raise ValueError("the fused MoE kernels read 2/4/8-bit int weights (groups with a power-of-two divisor >= 16) "
                         "and the 2-bit code")
    cfg_up, cfg_down = configs or (moe_config(t, top_k, num_experts, 2 * inter, bk_gate),
                                   moe_config(t, top_k, num_experts, hdim, bk_down))
    if cfg_up.bm != cfg_down.bm:
        raise ValueError("gate_up and down must use the same block of tokens (bm)")
    rows, block_expert = align(topk_ids, num_experts, cfg_up.bm)
    h = dispatch.empty((p, inter), x.dtype, x.device)
    rw = topk_weights.reshape(-1).to(torch.float32).contiguous()
    _launch(x, h, rows, block_expert, rw, gate, up, top_k, True, cfg_up, p, num_experts)
    y = dispatch.empty((p, hdim), torch.float32, x.device)
    _launch(h, y, rows, block_expert, rw, down, None, top_k, False, cfg_down, p, num_experts)
    return combine(y, add, t, top_k, x.dtype)


def combine(y: torch.Tensor, add: torch.Tensor | None, t: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    """One launch: out[t] = sum of the token's ``top_k`` slot rows of ``y`` (fp32 [T*top_k, H]) (+ ``add``), in dtype."""
    hdim = y.shape[-1]
    out = dispatch.empty((t, hdim), dtype, y.device)
    if add is not None and add.stride() != (hdim, 1):
        add = add.contiguous()
    bh = min(1024, triton.next_power_of_2(hdim))
    _combine_kernel[(t, triton.cdiv(hdim, bh))](y, out if add is None else add, out, hdim, S=top_k,
                                                HAS_ADD=add is not None, BH=bh, INTERPRET=INTERPRET, num_warps=4)
    return out
