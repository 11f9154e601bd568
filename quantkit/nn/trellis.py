"""Routed experts stored in the trellis code (``quantkit.format.trellis``), decoded per expert on the torch path.

A ``TrellisStack`` holds one projection of all E experts of a layer as ``[E, ...]`` buffers named by the
format module's leaves (``experts.down_proj.trellis`` <- ``experts.{e}.down_proj.trellis`` on disk).
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.format import trellis as fmt
from quantkit.nn.code2 import kernel_view
from quantkit.quant.qtensor import TrellisTensor

TRELLIS = "trellis"  # the first item of a ``QuantExperts`` scheme tuple (TRELLIS, bits, L)


class TrellisStack(nn.Module):
    """The trellis code of E stacked ``[N, K]`` weights (N outputs, K inputs), ``bits`` per weight, state bits L."""

    def __init__(self, num_experts: int, n: int, k: int, bits: int, L: int):
        super().__init__()
        fmt.check_params(bits, L)
        self.n, self.k, self.bits, self.L = n, k, bits, L
        for spec in fmt.tensor_specs("x", n, k, bits):
            self.register_buffer(spec.name[2:], torch.empty(num_experts, *spec.shape, dtype=spec.dtype))

    def kernel_weight(self, cols: slice = slice(None)) -> TrellisTensor:
        """All experts' code as one ``TrellisTensor`` (views, no copy): what the kernels read."""
        if cols != slice(None):
            raise ValueError("trellis stacks are not stored fused: no column slices")
        return kernel_view(self, None, tuple(map(self._buffers.get, fmt.LEAVES)),
                           lambda *ts: TrellisTensor(*ts, self.bits, self.L))

    def weight(self, dtype: torch.dtype, index: int, cols: slice = slice(None)) -> torch.Tensor:
        """Expert ``index``'s weight ``[N, K]`` in ``dtype`` (the reference decoder, fp32, then cast)."""
        return self.kernel_weight(cols).select(index).dequantize(dtype)
