"""Quantized modules that hold packed compressed-tensors tensors and dequantize on the fly (torch path).

``QuantLinear`` replaces an ``nn.Linear``; ``QuantExperts`` replaces ``Experts`` and keeps the routed
experts 3-D: each projection is a ``PackedStack`` of ``[E, ...]`` tensors whose names mirror the
per-expert ones on disk (``experts.gate_proj.weight_packed`` <- ``experts.{e}.gate_proj.weight_packed``).
Buffer names and shapes come from the format module.

``backend`` ("torch" by default; ``quantkit.load(..., backend=...)`` sets it) picks the pure-torch path or the
Triton kernels (``quantkit.kernels``), which read the same buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.format.compressed_tensors import PACKED, SCALE, SHAPE, ZERO, packed_words, unpack_rows
from quantkit.kernels import dispatch
from quantkit.kernels.reference import IntWeight
from quantkit.model.layers import Experts
from quantkit.nn.code2 import Code2Stack, kernel_view
from quantkit.nn.trellis import TRELLIS, TrellisStack
from quantkit.quant.qtensor import QTensor

CODE2 = "code2"  # a ``schemes`` value: the projection is stored in the 2-bit code (``nn/code2.py``)


def _whole(cols: slice) -> None:
    if cols != slice(None):
        raise ValueError("compressed-tensors int stacks are not stored fused: no column slices")


class PackedWeight(nn.Module):
    """The packed tensors of one ``[N, K]`` weight, or of E of them stacked (``lead=(E,)``)."""

    backend = "torch"

    def __init__(self, n: int, k: int, bits: int, group_size: int, symmetric: bool, scale_dtype: torch.dtype, lead=()):
        super().__init__()
        self.n, self.k, self.bits, self.group_size = n, k, bits, group_size
        groups = k // group_size
        self.register_buffer(PACKED, torch.empty(*lead, n, packed_words(k, bits), dtype=torch.int32))
        self.register_buffer(SCALE, torch.empty(*lead, n, groups, dtype=scale_dtype))
        self.register_buffer(SHAPE, torch.empty(*lead, 2, dtype=torch.int64))
        if symmetric:
            self.weight_zero_point = None
        else:
            self.register_buffer(ZERO, torch.empty(*lead, packed_words(n, bits), groups, dtype=torch.int32))

    def qtensor(self, index: int | None = None) -> QTensor:
        """Unpacked QTensor of the whole stack, or of one member of it."""
        sel = (lambda t: t) if index is None else (lambda t: t[index])
        codes = unpack_rows(sel(self.weight_packed), self.bits, self.k)
        zeros = None
        if self.weight_zero_point is not None:
            zeros = unpack_rows(sel(self.weight_zero_point).transpose(-1, -2), self.bits, self.n).transpose(-1, -2)
        return QTensor(codes, sel(self.weight_scale), zeros, self.bits, self.group_size)

    def weight(self, dtype: torch.dtype, index: int | None = None, cols: slice = slice(None)) -> torch.Tensor:
        _whole(cols)
        return self.qtensor(index).dequantize(dtype)

    def kernel_weight(self, cols: slice = slice(None)) -> IntWeight:
        """The buffers as the kernels take them (views, no copy); built once per set of buffers (a move to
        another device replaces them) instead of on every forward. ``cols`` (the ``Code2Stack`` signature) must
        be all of them: zero points packed along N have no column views."""
        _whole(cols)
        b = self._buffers
        return kernel_view(self, None, (b[PACKED], b[SCALE], b.get(ZERO)), self._build_kernel_weight)

    def _build_kernel_weight(self, packed, scale, zero) -> IntWeight:
        return IntWeight(packed, scale, zero, self.bits, self.group_size, self.n, self.k)


class QuantLinear(PackedWeight):
    """Drop-in for ``nn.Linear``: buffers named as on disk (``q_proj.weight_packed``, ...)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype, bias: bool = False):
        super().__init__(out_features, in_features, bits, group_size, symmetric, scale_dtype)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend != "torch":
            return dispatch.linear(x, self.kernel_weight(), self.bias, self.backend)
        return F.linear(x, self.weight(x.dtype), self.bias)


class QuantExperts(Experts):
    """Routed experts with packed per-projection stacks; ``project`` dequantizes one expert's weight.

    ``schemes[proj]`` is (bits, group, symmetric) for compressed-tensors int stacks or ``CODE2`` for the
    2-bit code, or (``TRELLIS``, bits, L) for the trellis code; ``fused_up_gate`` holds gate and up as one code stack ``up_gate_proj`` (FastDeploy layout).
    """

    backend = "torch"

    def __init__(self, num_experts: int, hidden: int, inter: int, schemes: dict[str, tuple | str],
                 scale_dtype: torch.dtype, fused_up_gate: bool = False):
        nn.Module.__init__(self)
        self.num_experts, self.inter = num_experts, inter
        self.fused = fused_up_gate
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        if fused_up_gate:
            self.up_gate_proj = Code2Stack(num_experts, 2 * inter, hidden)
            del shapes["gate_proj"], shapes["up_proj"]
        for name, (n, k) in shapes.items():
            scheme = schemes.get(name)
            if scheme == CODE2:
                setattr(self, name, Code2Stack(num_experts, n, k))
            elif isinstance(scheme, tuple) and scheme[0] == TRELLIS:
                setattr(self, name, TrellisStack(num_experts, n, k, *scheme[1:]))
            elif name in schemes:
                bits, group, sym = schemes[name]
                setattr(self, name, PackedWeight(n, k, bits, group, sym, scale_dtype, lead=(num_experts,)))
            else:  # left unquantized by the recipe
                setattr(self, name, nn.Parameter(torch.empty(num_experts, n, k), requires_grad=False))

    def _stack(self, name: str) -> tuple:
        """(storage, column slice) of projection ``name``: in the fused layout gate and up are the first and the
        second half of ``up_gate_proj``'s columns."""
        if self.fused and name != "down_proj":
            i = self.inter
            return self.up_gate_proj, slice(0, i) if name == "gate_proj" else slice(i, 2 * i)
        return getattr(self, name), slice(None)

    def expert_weight(self, e: int, name: str, dtype: torch.dtype) -> torch.Tensor:
        """Expert ``e``'s ``[N, K]`` weight of projection ``name`` in ``dtype`` (dequantized where stored quantized)."""
        w, cols = self._stack(name)
        return w[e].to(dtype) if isinstance(w, nn.Parameter) else w.weight(dtype, e, cols)

    def project(self, e: int, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.expert_weight(e, name, x.dtype))

    def kernel_projections(self) -> list | None:
        """gate, up, down as kernel weights (``quantkit.kernels.reference``), or None when one is not a
        quantized stack (a projection left unquantized by the recipe)."""
        stacks = [self._stack(name) for name in ("gate_proj", "up_proj", "down_proj")]
        if not all(hasattr(w, "kernel_weight") for w, _ in stacks):
            return None
        return [w.kernel_weight(cols) for w, cols in stacks]

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                add: torch.Tensor | None = None) -> torch.Tensor:
        """The fused MoE kernels when the backend is triton and every projection is a quantized stack; else the
        loop over experts."""
        projs = None if self.backend == "torch" or self.observer is not None else self.kernel_projections()
        if projs is None:
            return super().forward(x, topk_ids, topk_weights, add)
        return dispatch.fused_moe(x, topk_ids, topk_weights, *projs, self.backend, add)
