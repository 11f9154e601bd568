"""The packed format against the compressed-tensors package (the outside reader vLLM uses)."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from quantkit.format.compressed_tensors import linear_specs, linear_tensors, pack_rows, unpack_rows
from quantkit.quant.rtn import qrange, rtn

SHAPES = [(1, 1), (5, 37), (3, 64), (7, 130), (16, 96), (33, 250)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_pack_roundtrip_exact_and_equal_to_compressed_tensors(bits, shape):
    lo, hi = qrange(bits)
    codes = torch.randint(lo, hi + 1, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(bits))
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (shape[0], -(-shape[1] * bits // 32))
    assert torch.equal(unpack_rows(packed, bits, shape[1]), codes)
    assert torch.equal(packed, pack_to_int32(codes, bits))  # bit-identical to the reference packer
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(shape)), codes)
    # zero points are packed along N (dim 0)
    assert torch.equal(pack_rows(codes.t(), bits).t(), pack_to_int32(codes, bits, packed_dim=0))


def test_pack_rejects_out_of_range_and_bad_word_counts():
    with pytest.raises(ValueError, match="range"):
        pack_rows(torch.tensor([[8]], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_rows(torch.zeros(1, 3, dtype=torch.int32), 4, 8)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (3, 32, False), (2, 64, False), (8, 96, True)])
def test_compressed_tensors_decompresses_our_tensors(bits, group, sym):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w = torch.randn(40, 192, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    qt = rtn(w, bits, group, sym, scale_dtype=torch.bfloat16)
    tensors = {k.rsplit(".", 1)[1]: v for k, v in linear_tensors("m.proj", qt).items()}
    assert [(s.name, s.dtype, s.shape) for s in linear_specs("m.proj", 40, 192, bits, group, sym, torch.bfloat16)] == \
        [("m.proj." + k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group))
    out = PackedQuantizationCompressor.decompress(dict(tensors), scheme)
    # (q - z) * s is exact in fp32, so rounding ours once to the scale dtype must equal theirs bit for bit
    ours = qt.dequantize(out["weight"].dtype)
    assert torch.equal(out["weight"], ours)
    if not sym:
        assert torch.equal(out["weight_zero_point"].to(torch.int8), qt.zeros)
