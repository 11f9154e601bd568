"""A random ERNIE checkpoint wider than ernie-tiny, written once per test module (hidden 128, expert width 64:
every expert K is a multiple of 64, which the 2-bit code needs, and of 16, which the trellis code needs)."""

from quantkit.sources.random_models import ERNIE_TINY, write_random_checkpoint

WIDE = dict(ERNIE_TINY, hidden_size=128, moe_intermediate_size=64, intermediate_size=256, head_dim=32)


def write_src(tmp_path_factory, dims: dict = WIDE, dtype: str = "float32"):
    """Write ``dims`` as an HF checkpoint directory (seed 0) under a fresh temp dir; return its path."""
    path = tmp_path_factory.mktemp("src") / "ernie"
    path.mkdir()
    write_random_checkpoint(path, dims, seed=0, dtype=dtype, max_shard_bytes=1 << 30)
    return path
