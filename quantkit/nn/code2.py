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


def kernel_view(module: nn.Module, key, tensors: tuple, build):
    """``build(*tensors)`` memoized on ``module`` under ``key`` while ``tensors`` are the same objects (the views
    the kernels take stay valid through in-place loads; ``module.to(...)`` replaces the buffers and a new view
    is built). Saves rebuilding and re-checking the views on every forward of a decode step."""
    cache = module.__dict__.setdefault("_kernel_views", {})
    hit = cache.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], tensors)):
        hit = cache[key] = (tensors, build(*tensors))
    return hit[1]


class Code2Stack(nn.Module):
    """The code of E stacked ``[K, N]`` weights (N outputs, K inputs)."""

    def __init__(self, num_experts: int, n: int, k: int):
        super().__init__()
        wint2.check_k(k)
        self.n, self.k = n, k
        for spec in wint2.tensor_specs("x", n, k):
            self.register_buffer(spec.name[2:], torch.empty(num_experts, *spec.shape, dtype=spec.dtype))

    def kernel_weight(self, cols: slice = slice(None)) -> Code2Tensor:
        """All experts' code for columns ``cols`` (views, no copy): what the kernels read. Built once per
        column slice and set of buffers."""
        return kernel_view(self, (cols.start, cols.stop, cols.step), tuple(map(self._buffers.get, wint2.LEAVES)),
                           lambda *ts: Code2Tensor(*(t[..., cols] for t in ts)))

    def weight(self, dtype: torch.dtype, index: int, cols: slice = slice(None)) -> torch.Tensor:
        """Expert ``index``'s weight ``[N', K]`` (quantkit orientation) for columns ``cols`` of the stack."""
        return self.kernel_weight(cols).select(index).dequantize(dtype)
