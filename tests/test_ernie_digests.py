"""ERNIE's outputs are byte-identical across refactors: the w4g128 and w2code checkpoints (RTN, no calibration) of
a fixed random model hash to the digests recorded at commit 6405f1d, before the architecture specs (issue 14).

Only what servers read is hashed: the safetensors shard and config.json (quantkit.json carries the tool version
and quantize_report.json timings). A legitimate format change must update these digests in the same commit and
say why in its message.
"""

import hashlib

import pytest

from quantkit.pipeline.quantize import QuantizeOptions, quantize
from quantkit.quant.config import get_recipe
from random_src import write_src

RECORDED = {
    "w4g128": {
        "config.json": "98dfe5cf738354a75ebe2c9ddfea857b9d71781a1ba7153d0983f3b9c8f14200",
        "model.safetensors": "1a49847c8741ead04f09569cc6e258633caae7cf301f1db7bf6f907d842d984b",
    },
    "w2code": {
        "config.json": "03278a2d99520a71b6bab401bb9ed1806c03670e7cc8ccda43672023937581c8",
        "model.safetensors": "32905a12dc13c95e9ff04fe75c27d7830ed9c9d9289747c639795f2c2165a117",
    },
}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_src(tmp_path_factory)


@pytest.mark.parametrize("recipe", sorted(RECORDED))
def test_ernie_checkpoint_bytes_unchanged(src, tmp_path, recipe):
    out = tmp_path / recipe
    quantize(str(src), out, get_recipe(recipe), QuantizeOptions(progress=False))
    got = {name: hashlib.sha256((out / name).read_bytes()).hexdigest() for name in RECORDED[recipe]}
    assert got == RECORDED[recipe]
