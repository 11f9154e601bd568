"""ERNIE's MoE routing in one Triton launch; the twin is ``quantkit.model.layers.route``.

    logits = x @ W_router^T (fp32)  ->  probs = softmax(logits)  ->  top-k of probs + correction bias
    ->  weights = probs of the chosen experts / max(their sum, norm_min)

In torch that is about ten launches (cast, matmul, softmax, add, topk, gather, sum, clamp, div), each a few
µs at decode where the whole MoE layer's weights take ~17 µs to read in 4 bits: launches, not bytes, would
set the step time. A block of ``BT`` tokens is split over H among ``SPLIT`` programs (about two per SM over
the grid: at decode the router's 64 x 2560 fp32 weight is read by 40 programs, not one), each an fp32 (IEEE)
MMA over its H tiles; the program that arrives last for the block (an acquire-release counter, as in the
dense split-K) sums the partial logits in split order and does the softmax and the top-k (k rounds of
arg-max, ties to the lowest expert index as ``torch.topk`` does on a CPU) in registers. The experts' order
within a token may differ from ``torch.topk`` only where two scores tie; the fused MoE sums over them, so the
result does not depend on that order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels import dispatch



@triton.jit
def _route_kernel(x_ptr, w_ptr, bias_ptr, ids_ptr, wts_ptr, part_ptr, count_ptr, T, H, E, stride_x, stride_w,
                  norm_min, TOP_K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                  BH: tl.constexpr, SPLIT: tl.constexpr):
    pid_t = tl.program_id(0)
    offs_t = pid_t * BT + tl.arange(0, BT)
    t_mask = offs_t < T
    offs_e = tl.arange(0, BE)
    e_mask = offs_e < E
    h_tiles = tl.cdiv(H, BH)
    per_split = tl.cdiv(h_tiles, SPLIT)
    ht0 = tl.program_id(1) * per_split
    acc = tl.zeros((BT, BE), dtype=tl.float32)
    for ht in range(ht0, tl.minimum(ht0 + per_split, h_tiles)):
        offs_h = ht * BH + tl.arange(0, BH)
        h_mask = offs_h < H
        xt = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_h[None, :], mask=t_mask[:, None] & h_mask[None, :],
                     other=0.0).to(tl.float32)
        wt = tl.load(w_ptr + offs_e[:, None] * stride_w + offs_h[None, :], mask=e_mask[:, None] & h_mask[None, :],
                     other=0.0).to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision="ieee")
    if SPLIT > 1:  # partial logits; the program that arrives last for this token block sums them in split order
        part = part_ptr + offs_t[:, None] * BE + offs_e[None, :]
        tl.store(part + tl.program_id(1) * T * BE, acc, mask=t_mask[:, None])
        tl.debug_barrier()  # every thread's partial is written before the (one-thread) release below
        done = tl.atomic_add(count_ptr + pid_t, 1, sem="acq_rel")
        if done != SPLIT - 1:
            return
        tl.debug_barrier()
        acc = tl.zeros((BT, BE), dtype=tl.float32)
        for s in range(SPLIT):
            acc += tl.load(part + s * T * BE, mask=t_mask[:, None], other=0.0, cache_modifier=".cg")
        tl.atomic_xchg(count_ptr + pid_t, 0)
    logits = tl.where(e_mask[None, :], acc, float("-inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = p / tl.sum(p, axis=1)[:, None]
    score = tl.where(e_mask[None, :], probs + tl.load(bias_ptr + offs_e, mask=e_mask, other=0.0)[None, :],
                     float("-inf"))
    offs_k = tl.arange(0, KP)
    chosen = tl.zeros((BT, KP), dtype=tl.int32)
    chosen_p = tl.zeros((BT, KP), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        best = tl.max(score, axis=1)
        idx = tl.min(tl.where(score == best[:, None], offs_e[None, :], BE), axis=1)
        hit = offs_e[None, :] == idx[:, None]
        pj = tl.sum(tl.where(hit, probs, 0.0), axis=1)
        chosen = tl.where(offs_k[None, :] == j, idx[:, None], chosen)
        chosen_p = tl.where(offs_k[None, :] == j, pj[:, None], chosen_p)
        score = tl.where(hit, float("-inf"), score)
    weights = chosen_p / tl.maximum(tl.sum(chosen_p, axis=1), norm_min)[:, None]
    out = offs_t[:, None] * TOP_K + offs_k[None, :]
    mask = t_mask[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(ids_ptr + out, chosen.to(tl.int64), mask=mask)
    tl.store(wts_ptr + out, weights, mask=mask)


def route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, top_k: int,
          norm_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H] -> (topk_ids [T, k] int64, topk_weights [T, k] fp32), as ``layers.route``."""
    t, hdim = x.shape
    e = gate_weight.shape[0]
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k {top_k} must be in 1..{e}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    w = gate_weight if gate_weight.stride(-1) == 1 else gate_weight.contiguous()
    b = bias.reshape(-1).contiguous()
    ids = dispatch.empty((t, top_k), torch.int64, x.device)
    weights = dispatch.empty((t, top_k), torch.float32, x.device)
    if t == 0:
        return ids, weights
    bt = 16 if t <= 16 else 32
    be = max(16, triton.next_power_of_2(e))
    bh = 64 if be <= 64 else 32
    blocks = triton.cdiv(t, bt)
    split = max(1, min(triton.cdiv(hdim, bh), 2 * dispatch.sm_count(x.device) // blocks))
    part, counts = weights, weights  # unused without a split
    if split > 1:
        part = dispatch.empty((split, t, be), torch.float32, x.device)
        counts = dispatch.split_counters(x.device, blocks)
    _route_kernel[(blocks, split)](x, w, b, ids, weights, part, counts, t, hdim, e, x.stride(0), w.stride(0),
                                   norm_min, TOP_K=top_k, KP=triton.next_power_of_2(top_k), BT=bt, BE=be, BH=bh,
                                   SPLIT=split, num_warps=4)
    return ids, weights
