"""Weight descriptors the kernels take, and the pure-torch twins of every kernel (same signatures).

A twin dequantizes in fp32 with the format module's own code, casts to the activation dtype and calls
``torch.matmul``: the semantics every Triton kernel is tested against (and the ``backend="torch"`` path).

    IntWeight    compressed-tensors pack-quantized tensors of one [N, K] weight, or E stacked ([E, ...])
    Code2Weight  the 2-bit code (WINT2) tensors of one [K, N] weight, or E stacked ([E, ...])
    TrellisWeight the trellis code's tensors of one [N, K] weight, or E stacked ([E, ...])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantkit.format.compressed_tensors import packed_words, unpack_rows
from quantkit.quant.qtensor import Code2Tensor, TrellisTensor, dequantize

KERNEL_BITS = (2, 4, 8)  # int widths the Triton kernels read; 3-bit fields straddle int32 words (torch path)


@dataclass(frozen=True)
class IntWeight:
    """packed int32 [.., N, ceil(K*b/32)], scale [.., N, K/g], zero int32 [.., ceil(N*b/32), K/g] or None."""
    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bits: int
    group_size: int
    n: int
    k: int

    def __post_init__(self):
        if self.packed.shape[-2:] != (self.n, packed_words(self.k, self.bits)):
            raise ValueError(f"packed shape {list(self.packed.shape)} does not hold [{self.n}, {self.k}] {self.bits}-bit codes")
        if self.k % self.group_size or self.scale.shape[-2:] != (self.n, self.k // self.group_size):
            raise ValueError(f"scale shape {list(self.scale.shape)} does not match [{self.n}, {self.k}] in groups of {self.group_size}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[.., N, K] in ``dtype`` (fp32 math, then cast: what QuantLinear's torch path computes)."""
        codes = unpack_rows(self.packed, self.bits, self.k)
        zeros = None
        if self.zero is not None:
            zeros = unpack_rows(self.zero.transpose(-1, -2), self.bits, self.n).transpose(-1, -2)
        return dequantize(codes, self.scale, zeros, self.group_size, dtype)

    def expert(self, e: int) -> "IntWeight":
        return IntWeight(self.packed[e], self.scale[e], None if self.zero is None else self.zero[e],
                         self.bits, self.group_size, self.n, self.k)


# The 2-bit code as the kernels take it is the format's own container (column-slice views are fine).
Code2Weight = Code2Tensor
TrellisWeight = TrellisTensor  # the trellis code likewise ([.., N, K] decode through its exact value table)


Weight = IntWeight | Code2Weight | TrellisWeight


def linear(x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [.., K] -> x @ W^T (+ bias) [.., N] in x's dtype: dequantize, then matmul."""
    return F.linear(x, w.dequantize(x.dtype), bias)


int_linear = code2_linear = linear  # the twins of ``kernels.dense.int_linear`` and ``kernels.code2.code2_linear``


def gate_up(x: torch.Tensor, gate: Weight, up: Weight) -> torch.Tensor:
    """silu(x @ G^T) * (x @ U^T): the twin of ``kernels.dense.gate_up``."""
    return F.silu(linear(x, gate)) * linear(x, up)


def align(topk_ids: torch.Tensor, num_experts: int, bm: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The twin of ``kernels.fused_moe.align`` (its many-token path) in torch ops: (rows int32 [blocks*bm],
    block_expert int32 [blocks]). Pairs sorted by expert (stable), each expert's run padded to a multiple of
    ``bm`` with the pair count P; a block past the last run names expert E."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    p, dev = flat.numel(), flat.device
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + bm - 1) // bm * bm
    ends = padded.cumsum(0)
    first = counts.cumsum(0) - counts  # where each expert's pairs start in the sorted order
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    dest = ends[expert] - padded[expert] + torch.arange(p, device=dev) - first[expert]
    rows = torch.full((blocks * bm,), p, dtype=torch.int32, device=dev)
    rows[dest] = order.to(torch.int32)
    starts = torch.arange(blocks, device=dev) * bm
    block_expert = torch.searchsorted(ends, starts, right=True).to(torch.int32)  # == E past the last block
    return rows, block_expert


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
              gate: Weight, up: Weight, down: Weight, add: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], topk_ids / topk_weights [T, k] -> Σ_k w · down(silu(gate(x)) · up(x)) (+ ``add``) [T, H], with
    stacked [E, ...] weights; the loop of ``Experts.forward`` (weights applied in x's dtype, summed by
    index_add)."""
    out = torch.zeros_like(x)
    for e in torch.unique(topk_ids).tolist():
        tok, slot = torch.where(topk_ids == e)
        xe = x[tok]
        h = gate_up(xe, gate.expert(e), up.expert(e))
        y = linear(h, down.expert(e)) * topk_weights[tok, slot][:, None].to(x.dtype)
        out.index_add_(0, tok, y.to(out.dtype))
    return out if add is None else out + add
