"""The trellis code (QTIP / ExLlamaV3 class): tensor names, dtypes, shapes, bit order, the value code, the
Hadamard incoherence, bits/weight, and the reference decoder every other path is tested against.

One weight ``W`` ``[N, K]`` (quantkit orientation: N outputs, K inputs, y = x @ W^T) is stored as

    W = diag(svh) · H_N · Q · H_K · diag(suh)

* ``H_D`` is the block-diagonal normalized Sylvester Hadamard of size D in blocks of ``hadamard_block(D)``
  (the largest power of two <= 128 dividing D; symmetric and its own inverse).
* ``suh`` fp16 [K] and ``svh`` fp16 [N]: per-channel sign x scale (random signs, RMS scales).
* ``Q`` [N, K] are exact integers: the code value of a state, ``value(s)`` below, one state per weight.

Q is cut into 16 x 16 tiles; tile (i, j) holds rows 16i..16i+15 and columns 16j..16j+15, and its 256
weights form one tail-biting sequence in row-major order: t = 16 r + c (r = n % 16, c = k % 16).

Bit order. Each weight adds ``bits`` (= the tensor's K in QTIP's notation, 2/3/4) new bits to the tile's
circular bit stream of 256·bits bits; weight t owns stream positions [t·bits, (t+1)·bits). Its state is the
``L``-bit window ending at position (t+1)·bits, the oldest bit most significant:

    s_t = ((s_{t-1} << bits) | b_t) & (2^L - 1)         (circular: s_{-1} is the window ending at the end)

The stream is stored MSB-first in int32 words, ``8·bits`` words per tile: stream position p is bit
31 - (p % 32) of word p // 32. So, with q = ((t+1)·bits - 1) // 32 and sh = 31 - ((t+1)·bits - 1) % 32,

    s_t = (((word[q-1] : word[q]) as 64 bits) >> sh) & (2^L - 1)      (word[-1] = the tile's last word)

On disk, per weight named ``P`` (``...experts.{e}.down_proj`` etc.):

    P.trellis  int32 [N/16, K/16, 8·bits]   tiles in (row tile, column tile) order, one tile's words last
    P.suh      fp16  [K]
    P.svh      fp16  [N]

The value code ("MUL1", ExLlamaV3's default codebook, without its final fp16 affine map):

    x = (0x83DCD12D · s) mod 2^32;   value(s) = bytesum(x) - 510,   an integer in [-510, 510], RMS ≈ 147.8

EXL3 maps bytesum to (bytesum - 510) / 147.7 in fp16; here the 1/147.8 goes into the stored scales, so the
values are integers (exact in fp32 and fp16; bf16 holds |v| <= 256 exactly and rounds the rest to even
values): the table ``value_table(L)`` is bit-exact with any kernel that evaluates the same integer ops.
(Why MUL1: ``benchmarks/trellis_quality.py --codes`` compares the candidate codes at L = 12; MUL1 is as good
as the best there, 3INST and 1MAD, and costs one multiply and a byte sum.)

Rate: bits + 16·(N + K) / (N·K) bits per weight (every stored byte counted; no group scales).
"""

from __future__ import annotations

import functools
import math

import torch

from quantkit.format.wint2 import EXPERT_MODULE  # the planned 3-D routed-experts module names, shared by the formats
from quantkit.format.writer import TensorSpec

SCHEME = "trellis"
FORMAT_VERSION = 1
CONFIG_KEY = "quantkit_trellis"  # inside quantization_config (see ``config_block``)
TILE = 16  # tile side; a tile is one sequence of TILE * TILE weights
T = TILE * TILE
BITS = (2, 3, 4)  # bits per weight (one per tensor)
L_DEFAULT = 16  # state bits; QTIP / EXL3 use 16
L_RANGE = (8, 16)  # supported state bits (smaller L: a faster CPU encoder, a higher error; never implicit)
HAD_MAX = 128  # largest Hadamard block
MUL1 = 0x83DCD12D
VALUE_BIAS = 510  # bytesum of 4 bytes is in 0..1020
VALUE_RMS = math.sqrt(4 * (256 ** 2 - 1) / 12)  # RMS of the values for uniformly spread states (≈ 147.8)

TRELLIS, SUH, SVH = "trellis", "suh", "svh"
LEAVES = (TRELLIS, SUH, SVH)
SCALE_DTYPE = torch.float16


# -- parameters and shapes -------------------------------------------------------------------------

def check_params(bits: int, L: int) -> None:
    if bits not in BITS:
        raise ValueError(f"trellis: bits per weight must be one of {BITS}, got {bits}")
    if not L_RANGE[0] <= L <= L_RANGE[1] or L <= bits:
        raise ValueError(f"trellis: state bits L must be in {L_RANGE[0]}..{L_RANGE[1]} (and > bits), got {L}")


def words_per_tile(bits: int) -> int:
    return T * bits // 32


def hadamard_block(dim: int) -> int:
    """The Hadamard block for a dimension: the largest power of two <= 128 dividing it (>= 16)."""
    b = HAD_MAX
    while b >= TILE and dim % b:
        b //= 2
    if b < TILE:
        raise ValueError(f"trellis: dimension {dim} must be a multiple of {TILE}")
    return b


def check_shape(n: int, k: int, what: str = "weight") -> None:
    if n % TILE or k % TILE:
        raise ValueError(f"{what}: the trellis code needs N and K to be multiples of {TILE}, got N={n}, K={k}")


def bits_per_weight(n: int, k: int, bits: int) -> float:
    """Every stored byte: the trellis words plus the fp16 suh / svh."""
    return (n * k * bits + 16 * (n + k)) / (n * k)


def tensor_specs(prefix: str, n: int, k: int, bits: int) -> list[TensorSpec]:
    """The three tensors of one ``[N, K]`` weight named ``prefix``, in write order."""
    check_shape(n, k, prefix)
    return [TensorSpec(f"{prefix}.{TRELLIS}", torch.int32, (n // TILE, k // TILE, words_per_tile(bits))),
            TensorSpec(f"{prefix}.{SUH}", SCALE_DTYPE, (k,)),
            TensorSpec(f"{prefix}.{SVH}", SCALE_DTYPE, (n,))]


# -- the Hadamard incoherence ------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def _sylvester(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


def hadamard(b: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The normalized Sylvester Hadamard [b, b] (symmetric, orthogonal, its own inverse)."""
    return _sylvester(b).to(dtype=dtype, device=device)


def hadamard_last(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """x [.., D] -> x · H_D along the last dim, block-diagonal in ``block`` (default ``hadamard_block(D)``)."""
    d = x.shape[-1]
    b = block or hadamard_block(d)
    h = hadamard(b, x.dtype if x.dtype.is_floating_point else torch.float32, x.device)
    return (x.reshape(*x.shape[:-1], d // b, b) @ h).reshape(x.shape)


def rotate(w: torch.Tensor) -> torch.Tensor:
    """H_N · w · H_K for w [.., N, K] (the transform is its own inverse)."""
    return hadamard_last(hadamard_last(w).transpose(-1, -2)).transpose(-1, -2)


# -- the value code ---------------------------------------------------------------------------------

def code_values(s: torch.Tensor) -> torch.Tensor:
    """MUL1 values of int states s (any int dtype) -> int32 in [-510, 510]."""
    x = (s.to(torch.int64) * MUL1) & 0xFFFFFFFF
    return ((x & 0xFF) + ((x >> 8) & 0xFF) + ((x >> 16) & 0xFF) + (x >> 24) - VALUE_BIAS).to(torch.int32)


@functools.lru_cache(maxsize=8)
def _table(L: int) -> torch.Tensor:
    return code_values(torch.arange(1 << L)).to(torch.float32)


def value_table(L: int, device=None) -> torch.Tensor:
    """fp32 [2^L]: value(s) for every state (exact integers)."""
    return _table(L).to(device)


# -- tiles and the bit stream --------------------------------------------------------------------------

def to_tiles(q: torch.Tensor) -> torch.Tensor:
    """[.., N, K] -> [.., N/16, K/16, 256], weight (16i + r, 16j + c) at t = 16 r + c of tile (i, j)."""
    *lead, n, k = q.shape
    check_shape(n, k)
    t = q.reshape(*lead, n // TILE, TILE, k // TILE, TILE).transpose(-3, -2)
    return t.reshape(*lead, n // TILE, k // TILE, T)


def from_tiles(t: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_tiles``: [.., N/16, K/16, 256] -> [.., N, K]."""
    *lead, i, j, _ = t.shape
    return t.reshape(*lead, i, j, TILE, TILE).transpose(-3, -2).reshape(*lead, i * TILE, j * TILE)


def pack_symbols(sym: torch.Tensor, bits: int) -> torch.Tensor:
    """symbols int [.., 256] in 0..2^bits-1 -> int32 words [.., 8·bits], MSB-first (module doc)."""
    if bool(((sym < 0) | (sym >= (1 << bits))).any()):
        raise ValueError(f"trellis symbols must be {bits}-bit")
    shifts = torch.arange(bits - 1, -1, -1, device=sym.device)
    stream = ((sym.to(torch.int64)[..., None] >> shifts) & 1).reshape(*sym.shape[:-1], -1, 32)  # [.., W, 32]
    w = (stream << torch.arange(31, -1, -1, device=sym.device)).sum(-1)  # int64 in [0, 2^32)
    return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)


def unpack_symbols(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_symbols``: int32 [.., 8·bits] -> int64 symbols [.., 256]."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    stream = (w[..., None] >> torch.arange(31, -1, -1, device=w.device)) & 1  # [.., W, 32]
    stream = stream.reshape(*w.shape[:-1], T, bits)
    return (stream << torch.arange(bits - 1, -1, -1, device=w.device)).sum(-1)


def states(words: torch.Tensor, bits: int, L: int) -> torch.Tensor:
    """int32 words [.., 8·bits] -> every weight's state int64 [.., 256], by the two-word window (module doc)."""
    nw = words_per_tile(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    end = (torch.arange(T, device=w.device) + 1) * bits - 1  # last stream position of weight t
    q = end // 32
    hi = w[..., (q - 1) % nw]
    lo = w[..., q]
    return (((hi << 32) | lo) >> (31 - end % 32)) & ((1 << L) - 1)


def symbols_from_states(s: torch.Tensor, bits: int) -> torch.Tensor:
    """The newest ``bits`` of each state: the symbols a state path stores."""
    return s & ((1 << bits) - 1)


# -- the reference decoder -------------------------------------------------------------------------------

def _check(trellis: torch.Tensor, suh: torch.Tensor, svh: torch.Tensor, bits: int) -> tuple[int, int]:
    if trellis.dtype != torch.int32:
        raise ValueError(f"trellis must be int32, got {trellis.dtype}")
    *lead, i, j, w = trellis.shape
    if w != words_per_tile(bits):
        raise ValueError(f"trellis has {w} words per tile, {bits}-bit tiles need {words_per_tile(bits)}")
    n, k = i * TILE, j * TILE
    if tuple(suh.shape) != (*lead, k) or tuple(svh.shape) != (*lead, n):
        raise ValueError(f"suh/svh shapes {list(suh.shape)}, {list(svh.shape)} != {[*lead, k]}, {[*lead, n]}")
    return n, k


def decode_q(trellis: torch.Tensor, bits: int, L: int) -> torch.Tensor:
    """The integer values Q fp32 [.., N, K] (exact), through the value table."""
    check_params(bits, L)
    return from_tiles(value_table(L, trellis.device)[states(trellis, bits, L)])


def decode(trellis: torch.Tensor, suh: torch.Tensor, svh: torch.Tensor, bits: int, L: int) -> torch.Tensor:
    """The reference decoder: fp32 weights [.., N, K] = diag(svh) H_N Q H_K diag(suh)."""
    _check(trellis, suh, svh, bits)
    w = rotate(decode_q(trellis, bits, L))
    return w * svh.float()[..., :, None] * suh.float()[..., None, :]


# -- whole modules (planned 3-D routed experts) -----------------------------------------------------------

def expert_prefixes(module: str, num_experts: int, spec) -> list[str]:
    """Disk prefixes of a planned 3-D experts module (canonical name), one per expert, under the family's
    Hub names (``arch.spec.hub_prefixes``)."""
    from quantkit.model.arch.spec import hub_prefixes

    if not EXPERT_MODULE.match(module):
        raise ValueError(f"{module}: the trellis code is for routed experts only")
    return hub_prefixes(spec, module, num_experts)


def module_specs(module: str, shape: tuple[int, int, int], bits: int, spec) -> list[TensorSpec]:
    e, n, k = shape
    return [s for p in expert_prefixes(module, e, spec) for s in tensor_specs(p, n, k, bits)]


def module_tensors(module: str, tt, spec) -> dict[str, torch.Tensor]:
    """On-disk tensors of a planned experts module from its stacked ``TrellisTensor`` ``tt`` ([E, ..])."""
    parts = tt.tensors()
    return {f"{p}.{leaf}": t[e].contiguous() for e, p in enumerate(expert_prefixes(module, tt.trellis.shape[0], spec))
            for leaf, t in parts.items()}


def config_block(modules: dict[str, tuple[int, int]]) -> dict:
    """``quantization_config[CONFIG_KEY]``: the scheme, its constants, and per module (in-memory names, all
    experts of a layer each) its bits per weight and state bits L."""
    return {"scheme": SCHEME, "format_version": FORMAT_VERSION, "tile": TILE, "code": "mul1", "scale_dtype": "float16",
            "hadamard_max_block": HAD_MAX,
            "modules": {m: {"bits": b, "state_bits": L} for m, (b, L) in sorted(modules.items())},
            "decode": "s_t = state_bits-bit window of the tile's MSB-first stream ending at (t+1)*bits; "
                      "q = bytesum((0x83DCD12D*s) mod 2^32) - 510; W = diag(svh) H_N Q H_K diag(suh)"}
