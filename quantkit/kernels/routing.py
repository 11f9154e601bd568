"""MoE routing in one Triton launch, for every ``RouterSpec``; the twin is ``quantkit.model.routers.route``.

    logits = x @ W_router^T (fp32)  ->  scores = softmax(logits) | sigmoid(logits)
    ->  choice = scores (+ correction bias), restricted to the ``topk_group`` best of ``n_group`` groups
    ->  top-k of choice  ->  weights = scores of the chosen experts
        (/ max(their sum, norm_min) | / (sum [+ 1e-20 for sigmoid]) when renormalised) * routed_scaling_factor

In torch that is about ten launches (cast, matmul, softmax, add, topk, gather, sum, clamp, div), each a few
µs at decode where the whole MoE layer's weights take ~17 µs to read in 4 bits: launches, not bytes, would
set the step time. A block of ``BT`` tokens is split over H among ``SPLIT`` programs (about two per SM over
the grid: at decode the router's 64 x 2560 fp32 weight is read by 40 programs, not one), each an fp32 (IEEE)
MMA over its H tiles; the program that arrives last for the block (an acquire-release counter, as in the
dense split-K) sums the partial logits in split order and does the scoring, the group choice and the top-k
(k rounds of arg-max, ties to the lowest expert index as ``torch.topk`` does on a CPU) in registers.

The variants are constexpr specialisations (one compiled kernel per family's router): ``SIGMOID``,
``HAS_BIAS``, ``NORM`` (0 none, 1 plain sum, 2 sum clamped from below by ``norm_min``), ``N_GROUP`` /
``TOPK_GROUP`` (1 / 1: no groups) and ``SCALE`` (whether ``routed_scaling_factor`` multiplies). A group scores
the sum of its two best biased scores (two rounds of arg-max, so a tie counts twice as ``topk(2)`` does);
experts outside the chosen groups are -inf for the choice and never chosen (the wrapper refuses a spec whose
top-k exceeds the experts the groups leave eligible). The experts' order within a token may differ from
``torch.topk`` only where two scores tie; the fused MoE sums over them, so the result does not depend on it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.errors import UsageError
from quantkit.kernels import dispatch
from quantkit.model.routers import RouterSpec

NORM_NONE, NORM_SUM, NORM_CLAMP = 0, 1, 2


@triton.jit
def _route_kernel(x_ptr, w_ptr, bias_ptr, ids_ptr, wts_ptr, part_ptr, count_ptr, T, H, E, stride_x, stride_w,
                  norm_min, scaling, TOP_K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr,
                  BH: tl.constexpr, SPLIT: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                  NORM: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GS: tl.constexpr,
                  GP: tl.constexpr, SCALE: tl.constexpr):
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
    if SIGMOID:
        probs = tl.where(e_mask[None, :], 1.0 / (1.0 + tl.exp(-acc)), 0.0)
    else:
        logits = tl.where(e_mask[None, :], acc, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = p / tl.sum(p, axis=1)[:, None]
    score = probs
    if HAS_BIAS:
        score = probs + tl.load(bias_ptr + offs_e, mask=e_mask, other=0.0)[None, :]
    score = tl.where(e_mask[None, :], score, float("-inf"))
    if N_GROUP > 1:  # group-limited choice: only the experts of the TOPK_GROUP best groups stay eligible
        group_of = offs_e // GS  # experts padded past E fall in no real group
        offs_g = tl.arange(0, GP)
        gscore = tl.full((BT, GP), float("-inf"), tl.float32)
        for g in tl.static_range(N_GROUP):
            s = tl.where(group_of[None, :] == g, score, float("-inf"))
            m1 = tl.max(s, axis=1)
            i1 = tl.min(tl.where(s == m1[:, None], offs_e[None, :], BE), axis=1)
            m2 = tl.max(tl.where(offs_e[None, :] == i1[:, None], float("-inf"), s), axis=1)
            gscore = tl.where(offs_g[None, :] == g, (m1 + m2)[:, None], gscore)
        eligible = tl.zeros((BT, BE), dtype=tl.int32)
        for _ in tl.static_range(TOPK_GROUP):
            best = tl.max(gscore, axis=1)
            gi = tl.min(tl.where(gscore == best[:, None], offs_g[None, :], GP), axis=1)
            eligible = tl.where(group_of[None, :] == gi[:, None], 1, eligible)
            gscore = tl.where(offs_g[None, :] == gi[:, None], float("-inf"), gscore)
        score = tl.where(eligible != 0, score, float("-inf"))
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
    weights = chosen_p
    if NORM == 2:
        weights = chosen_p / tl.maximum(tl.sum(chosen_p, axis=1), norm_min)[:, None]
    elif NORM == 1:
        total = tl.sum(chosen_p, axis=1)
        if SIGMOID:
            total = total + 1e-20
        weights = chosen_p / total[:, None]
    if SCALE:
        weights = weights * scaling
    out = offs_t[:, None] * TOP_K + offs_k[None, :]
    mask = t_mask[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(ids_ptr + out, chosen.to(tl.int64), mask=mask)
    tl.store(wts_ptr + out, weights, mask=mask)


def norm_mode(spec: RouterSpec) -> int:
    """The kernel's ``NORM`` constexpr for a spec: none, the plain sum, or ERNIE's clamped sum."""
    if not spec.renormalize:
        return NORM_NONE
    return NORM_CLAMP if spec.norm_min > 0 else NORM_SUM


def route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, spec: RouterSpec
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], gate_weight [E, H], bias [E] or [1, E] (when ``spec.has_bias``) -> (topk_ids [T, k] int64,
    topk_weights [T, k] fp32), as ``routers.route``."""
    t, hdim = x.shape
    e, k = gate_weight.shape[0], spec.top_k
    if e != spec.num_experts:
        raise UsageError(f"router: gate weight has {e} experts, the router spec {spec.num_experts}")
    if spec.has_bias and (bias is None or bias.numel() != e):
        raise UsageError(f"router: the spec needs a correction bias of {e} values, got "
                         f"{None if bias is None else tuple(bias.shape)}")
    n_group = max(1, spec.n_group)
    topk_group = spec.topk_group if n_group > 1 else 1
    if n_group > 1 and k > topk_group * (e // n_group):
        raise UsageError(f"router: top_k={k} exceeds the {topk_group * (e // n_group)} experts that "
                         f"topk_group={topk_group} of n_group={n_group} groups leave eligible")
    if x.stride(-1) != 1:
        x = x.contiguous()
    w = gate_weight if gate_weight.stride(-1) == 1 else gate_weight.contiguous()
    ids = dispatch.empty((t, k), torch.int64, x.device)
    weights = dispatch.empty((t, k), torch.float32, x.device)
    if t == 0:
        return ids, weights
    b = bias.reshape(-1).float().contiguous() if spec.has_bias else weights  # unused without a bias
    be = max(16, triton.next_power_of_2(e))
    bt = 16 if t <= 16 or be >= 256 else 32
    # registers: at 4 warps up to 2048 (token, expert) scores x 6 top-k rounds compile without spilling on sm_90
    # (ERNIE's 32 x 64, top-6); wider routers (OLMoE's top-8, Qwen3's 128, DeepSeek's grouped 256) take 8 warps,
    # with one pipeline stage for 32-token blocks (ptxas otherwise gives OLMoE's 32 x 64 top-8 an 8-byte stack
    # frame; 16-token blocks need the default three, Qwen3's 16 x 128 gets one with a single stage). The check:
    # benchmarks/kernel_compile.py compiles every family's router variant for sm_90 and fails on any spill.
    warps, stages = (4, 3) if bt * be * k <= 2048 * 6 else (8, 1 if bt == 32 else 3)
    bh = 64 if be <= 64 else 32
    blocks = triton.cdiv(t, bt)
    split = max(1, min(triton.cdiv(hdim, bh), 2 * dispatch.sm_count(x.device) // blocks))
    part, counts = weights, weights  # unused without a split
    if split > 1:
        part = dispatch.empty((split, t, be), torch.float32, x.device)
        counts = dispatch.split_counters(x.device, blocks)
    _route_kernel[(blocks, split)](
        x, w, b, ids, weights, part, counts, t, hdim, e, x.stride(0), w.stride(0), spec.norm_min,
        spec.routed_scaling_factor, TOP_K=k, KP=triton.next_power_of_2(k), BT=bt, BE=be, BH=bh, SPLIT=split,
        SIGMOID=spec.scoring == "sigmoid", HAS_BIAS=spec.has_bias, NORM=norm_mode(spec), N_GROUP=n_group,
        TOPK_GROUP=topk_group, GS=e // n_group, GP=triton.next_power_of_2(n_group),
        SCALE=spec.routed_scaling_factor != 1.0, num_warps=warps, num_stages=stages)
    return ids, weights
