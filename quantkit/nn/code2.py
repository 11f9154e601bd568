"""Routed experts stored in the 2-bit convolutional code, dequantized per expert on the torch path.

A ``Code2Stack`` holds one projection of all E experts of a layer as ``[E, ...]`` buffers named by the
format module's leaves (``experts.down_proj.quant_weight`` <- ``experts.{e}.down_proj.quant_weight`` on
disk). FastDeploy-layout checkpoints store gate and up fused (``up_gate_proj``, gate columns first): they
load into one stack of width 2I, and ``weight(..., cols=...)`` decodes only the half that is asked for
(decoding is column-wise, so the halves decode exactly as separate gate/up stacks would).
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.format import wint2
from quantkit.quant.qtensor import Code2Tensor


class Code2Stack(nn.Module):
    """The code of E stacked ``[K, N]`` weights (N outputs, K inputs)."""

    def __init__(self, num_experts: int, n: int, k: int):
        super().__init__()
        wint2.check_k(k)
        self.n, self.k = n, k
        for spec in wint2.tensor_specs("x", n, k):
            self.register_buffer(spec.name[2:], torch.empty(num_experts, *spec.shape, dtype=spec.dtype))

    def kernel_weight(self, cols: slice = slice(None)) -> Code2Tensor:
        """All experts' code for columns ``cols`` (views, no copy): what the kernels read."""
        return Code2Tensor(*(getattr(self, leaf)[..., cols] for leaf in wint2.LEAVES))

    def weight(self, dtype: torch.dtype, index: int, cols: slice = slice(None)) -> torch.Tensor:
        """Expert ``index``'s weight ``[N', K]`` (quantkit orientation) for columns ``cols`` of the stack."""
        return self.kernel_weight(cols).select(index).dequantize(dtype)
