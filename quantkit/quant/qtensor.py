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

    def select(self, index) -> "QTensor":
        """One expert (or a slice of experts) of a stacked tensor."""
        return QTensor(self.codes[index], self.scales[index], None if self.zeros is None else self.zeros[index],
                       self.bits, self.group_size)

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


@dataclass
class Code2Tensor:
    """The 2-bit convolutional code of one weight or of E stacked expert weights, held exactly as on disk
    (``quantkit.format.wint2`` documents names, dtypes, layout and the decoder):
        quant_weight uint8 [.., K/4, N]   weight_scale uint8 [.., ceil(K/128), N]   super_scales bf16 [.., N]
        code_scale   fp32  [.., N]        code_zp      fp32  [.., N]
    Unlike ``QTensor`` it is stored input-major (``[K, N]``, FastDeploy's layout); ``dequantize`` returns
    quantkit's ``[.., N, K]`` orientation so both kinds plug into the same modules and error measures.
    """

    quant_weight: torch.Tensor
    weight_scale: torch.Tensor
    super_scales: torch.Tensor
    code_scale: torch.Tensor
    code_zp: torch.Tensor

    @property
    def shape(self) -> tuple[int, ...]:
        """(.., N, K), like ``QTensor.shape``."""
        *lead, r, n = self.quant_weight.shape
        return (*lead, n, r * 4)

    @property
    def n(self) -> int:
        return self.quant_weight.shape[-1]

    @property
    def k(self) -> int:
        return self.quant_weight.shape[-2] * 4

    def tensors(self) -> dict[str, torch.Tensor]:
        """Leaf name (``quant_weight``, ...) -> tensor."""
        from quantkit.format.wint2 import LEAVES

        return {leaf: getattr(self, leaf) for leaf in LEAVES}

    def select(self, index) -> "Code2Tensor":
        """One expert (or a slice of experts) of a stacked code."""
        return Code2Tensor(*(t[index] for t in self.tensors().values()))

    expert = select  # the kernels' name (``quantkit.kernels.reference``)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """fp32 reference decode (``wint2.decode``), transposed to [.., N, K], then cast."""
        from quantkit.format.wint2 import decode

        return decode(**self.tensors()).transpose(-1, -2).to(dtype)


@dataclass
class TrellisTensor:
    """The trellis code of one weight or of E stacked expert weights, held exactly as on disk
    (``quantkit.format.trellis`` documents names, dtypes, layout, bit order and the decoder):
        trellis int32 [.., N/16, K/16, 8·bits]   suh fp16 [.., K]   svh fp16 [.., N]
    plus the tensor's ``bits`` per weight and state bits ``L``. ``dequantize`` returns [.., N, K].
    """

    trellis: torch.Tensor
    suh: torch.Tensor
    svh: torch.Tensor
    bits: int
    L: int

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, i, j, _ = self.trellis.shape
        return (*lead, i * 16, j * 16)

    @property
    def n(self) -> int:
        return self.svh.shape[-1]

    @property
    def k(self) -> int:
        return self.suh.shape[-1]

    def tensors(self) -> dict[str, torch.Tensor]:
        from quantkit.format.trellis import LEAVES

        return {leaf: getattr(self, leaf) for leaf in LEAVES}

    def select(self, index) -> "TrellisTensor":
        return TrellisTensor(self.trellis[index], self.suh[index], self.svh[index], self.bits, self.L)

    expert = select  # the kernels' name (``quantkit.kernels.reference``)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """fp32 reference decode (``trellis.decode``), then cast."""
        from quantkit.format.trellis import decode

        return decode(self.trellis, self.suh, self.svh, self.bits, self.L).to(dtype)
