"""``QTensor``: the contract between quantizers and the packer.

Integer weights on a grouped grid, for ``[N, K]`` or ``[E, N, K]`` weights:
    codes  int8  [.., N, K]     signed, in [-2^(b-1), 2^(b-1) - 1] (compressed-tensors' convention)
    scales float [.., N, K/g]   stored dtype (the model's, e.g. bf16)
    zeros  int8  [.., N, K/g]   signed, same range as codes; None when symmetric
    w ≈ (codes - zeros) * scales, group j covering inputs j*g .. j*g + g - 1
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QTensor:
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int

    def __post_init__(self):
        *lead, n, k = self.codes.shape
        assert self.codes.dtype == torch.int8, self.codes.dtype
        assert k % self.group_size == 0, (k, self.group_size)
        assert tuple(self.scales.shape) == (*lead, n, k // self.group_size), (self.scales.shape, self.codes.shape)
        assert self.zeros is None or self.zeros.shape == self.scales.shape

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """fp32 math, then cast: the one dequantization every path (torch, kernels, tests) agrees on."""
        return dequantize(self.codes, self.scales, self.zeros, self.group_size, dtype)


def dequantize(codes, scales, zeros, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """codes [.., N, K] int, scales/zeros [.., N, K/g] -> weights [.., N, K] in ``dtype``."""
    *lead, n, k = codes.shape
    q = codes.float().reshape(*lead, n, k // group_size, group_size)
    if zeros is not None:
        q = q - zeros.float()[..., None]
    return (q * scales.float()[..., None]).reshape(*lead, n, k).to(dtype)
