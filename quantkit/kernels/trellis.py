"""Triton GEMM / GEMV and fused MoE for the trellis code (``quantkit.format.trellis``).

With W = diag(svh) H_N Q H_K diag(suh) (Q the integer values, H block Hadamards):

    y = x W^T = H_N( H_K(x ⊙ suh) · Q^T ) ⊙ svh

* The GEMM is the dense kernel of ``kernels/dense.py`` with ``KIND_TRELLIS`` tiles: each weight's state is
  cut out of two words of its tile's bit stream and mapped to its value in registers
  (``tiles.trellis_values``: shifts, one multiply and a byte sum; no lookup table). The tile is integers in
  [-510, 510] and no scale is applied in the loop; fp16 (and the interpreter's fp32) MMAs see them exactly,
  a bf16 MMA rounds |v| > 256 to an even value (relative error <= 2^-9, the size of the twin's own rounding
  of its bf16 weights).
* The incoherence is applied to the activations, not the weights: ``x ⊙ suh`` and H_K before the GEMM,
  H_N and ``⊙ svh`` after it, as block matmuls in torch (``format.trellis.hadamard_last``, the same function
  the encoder and the reference decoder use). A fused in-kernel Hadamard epilogue (EXL3's ``had_guad``) is
  not built yet.
* Fused MoE: per (token, expert) pair, x[token] ⊙ suh_e and H_K; the gate and up GEMMs are launches of the
  fused-MoE kernel over the pairs grouped by expert (``fused_moe.align``); H_N ⊙ svh_e, SiLU·up,
  ⊙ suh_down_e and H_I in torch; the down GEMM (routing weight applied per pair); H_H ⊙ svh_down_e; the sum
  over a token's pairs is ``fused_moe``'s combine kernel.

Twins: ``reference.linear`` / ``reference.fused_moe`` (decode the weight with the reference decoder, then
matmul); the tests compare both with a float64 oracle.
"""

from __future__ import annotations

import torch

from quantkit.format import trellis as fmt
from quantkit.kernels import dispatch
from quantkit.kernels.dense import Config, launch_linear
from quantkit.kernels.reference import TrellisWeight
from quantkit.kernels.tiles import KIND_TRELLIS

BK = 64  # inputs per K tile: four trellis tiles


def trellis_launch_args(w: TrellisWeight, config: Config | None = None) -> tuple:
    """``launch_linear``'s weight arguments (kind .. bk) for the integer values Q of a trellis weight."""
    t = w.trellis
    if t.dtype != torch.int32 or not t.is_contiguous():
        raise ValueError("the trellis kernel reads contiguous int32 tile words")
    if w.k % BK or (config is not None and config.bk != BK):
        raise ValueError(f"the trellis kernel works in {BK}-input tiles (K a multiple of {BK}, bk={BK}), got K={w.k}")
    fmt.check_params(w.bits, w.L)
    return KIND_TRELLIS, (t,) * 5, (t.stride(-3), 0, 0), w.n, w.k, w.L, w.k, w.bits, False, BK


def rotate_in(x: torch.Tensor, suh: torch.Tensor) -> torch.Tensor:
    """H_K(x ⊙ suh) in fp32, cast back to x's dtype (what the GEMM reads)."""
    return fmt.hadamard_last(x.float() * suh.float()).to(x.dtype)


def rotate_out(z: torch.Tensor, svh: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """H_N(z) ⊙ svh in fp32, then ``dtype``."""
    return (fmt.hadamard_last(z.float()) * svh.float()).to(dtype)


def trellis_linear(x: torch.Tensor, w: TrellisWeight, bias: torch.Tensor | None = None,
                   config: Config | None = None) -> torch.Tensor:
    """x [.., K] -> x @ W^T (+ bias) [.., N] in x's dtype; the twin is ``reference.linear``."""
    z = launch_linear(rotate_in(x, w.suh), *trellis_launch_args(w, config), None, config)
    y = rotate_out(z, w.svh, x.dtype)
    return y if bias is None else y + bias.to(y.dtype)


def _expert_gemm(xs, rows, block_expert, rw, w: TrellisWeight, cfg: Config, out_dtype):
    """Per pair p (grouped by expert): xs[p] @ Q_e^T * rw[p], through the fused-MoE kernel's grouped GEMM."""
    from quantkit.kernels.fused_moe import _launch

    p = xs.shape[0]
    out = dispatch.empty((p, w.n), out_dtype, xs.device)
    _launch(xs, out, rows, block_expert, rw, w, None, 1, False, cfg, p, w.trellis.shape[0])
    return out


def trellis_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate: TrellisWeight,
                up: TrellisWeight, down: TrellisWeight, add: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts for x [T, H] with stacked [E, ...] trellis weights (module doc), plus ``add``;
    the twin is ``reference.fused_moe``."""
    from quantkit.kernels.fused_moe import align, combine, moe_config

    t, hdim = x.shape
    top_k, num_experts = topk_ids.shape[1], gate.trellis.shape[0]
    if t == 0:
        return torch.zeros_like(x) if add is None else add.clone()
    p = t * top_k
    pair_expert = topk_ids.reshape(-1).long()
    tok = torch.arange(t, device=x.device).repeat_interleave(top_k)
    cfg_up = moe_config(t, top_k, num_experts, gate.n, BK)
    cfg_down = moe_config(t, top_k, num_experts, hdim, BK)
    if cfg_up.bm != cfg_down.bm:
        raise ValueError("gate/up and down must use the same block of tokens (bm)")
    rows, block_expert = align(topk_ids, num_experts, cfg_up.bm)  # rows None: block b is pair b (decode)
    ones = torch.ones(p, dtype=torch.float32, device=x.device)
    xt = x[tok]  # [P, H]: every pair reads its token's row, rotated with its expert's suh (gate's and up's differ)
    g = _expert_gemm(rotate_in(xt, gate.suh[pair_expert]), rows, block_expert, ones, gate, cfg_up, x.dtype)
    u = _expert_gemm(rotate_in(xt, up.suh[pair_expert]), rows, block_expert, ones, up, cfg_up, x.dtype)
    h = torch.nn.functional.silu(rotate_out(g, gate.svh[pair_expert], torch.float32)) \
        * rotate_out(u, up.svh[pair_expert], torch.float32)
    rw = topk_weights.reshape(-1).to(torch.float32).contiguous()
    hd = rotate_in(h.to(x.dtype), down.suh[pair_expert])
    y = _expert_gemm(hd, rows, block_expert, rw, down, cfg_down, torch.float32)
    y = rotate_out(y, down.svh[pair_expert], torch.float32).contiguous()
    return combine(y, add, t, top_k, x.dtype)
