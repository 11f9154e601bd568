"""Encoder for the trellis code (layout, bit order, values and decoder: ``quantkit.format.trellis``).

    trellis(w, H=None, bits=2, L=16) -> TrellisTensor        w: [N, K] or [E, N, K], N and K multiples of 16

1. Incoherence (``incoherence``): per output row n an RMS scale r_n, per input column k an RMS scale c_k
   (of W / r, mean 1), each times a seeded random sign; one global step per weight (matrix) so that the
   rotated target has the code's RMS. suh = sign·c / sqrt(RMS_code), svh = sign·r·a·sqrt(RMS_code) (fp16),
   and the target is X = H_N · diag(1/svh) W diag(1/suh) · H_K with the *rounded* fp16 scales, in the
   code's integer units (value(s) in [-510, 510]).
2. Viterbi (``viterbi`` / ``traceback``), vectorized over a batch of tiles: the cost of every state s after
   weight t, C_t[s] = (x_t - value(s))² + min over the 2^bits predecessors of C_{t-1}; a predecessor of s is
   (s >> bits) | (p << (L - bits)), so the minimum is over one axis of C viewed [B, 2^bits, 2^(L-bits)],
   taken values-only; the traceback re-finds each step's best predecessor p from the kept C_{t-1} (2^bits
   candidates per tile and step). Each step costs B·2^L state evaluations whatever ``bits`` is.
3. Tail-biting (``encode_tiles``, two passes as QTIP / EXL3 do): pass 1 runs the sequence rotated by T/2
   without constraints and reads z = s_0 >> bits off its best path (position 0 is mid-sequence there, where
   the path has settled); pass 2 restricts s_0 >> bits = z and ends in a state with s & (2^(L-bits)-1) = z,
   which is what makes the stored stream circular (the decoder's s_0 wraps around to the last symbols).
4. Hessian-aware rounding (LDLQ, with ``H`` = Σ xᵀx [.., K, K]): H is rotated like the inputs
   (Hq = H_K diag(suh) H diag(suh) H_K); 16-column strips of X are encoded first to last, all the strip's
   tiles (over rows and experts) in one batched Viterbi call, and each strip's error is fed forward to the
   columns not yet encoded through the upper Cholesky factor U of Hq⁻¹ (E = δ U_bb⁻¹, X_rest -= E U_b,rest):
   GPTQ with 16-column blocks, i.e. LDLQ with a 16×16 block LDL. Within a tile the Viterbi minimizes the
   plain squared error (as QTIP and EXL3 do).

Cost on CPU: 2 passes x 256 steps x 2^L states per tile, one thread (``ENCODE_THREADS``), ``tile_batch(L)``
tiles per call (``benchmarks/trellis_quality.py`` measures weights/s): L = 16 (the format's default, QTIP's and
EXL3's) is a GPU setting; a CPU run can ask for a smaller L explicitly (``L=``, recipes' ``state_bits``),
which costs MSE (measured in the same benchmark) and is recorded in the checkpoint.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from quantkit.format import trellis as fmt
from quantkit.quant.gptq import fix_dead_inputs, inverse_cholesky
from quantkit.quant.qtensor import TrellisTensor

# tiles per Viterbi call: bounds the cost history the traceback reads (256 steps x batch x 2^L fp32), 256 MB:
# 1024 tiles at L = 8, 64 at L = 12, 4 at L = 16
HISTORY_BYTES = 256 << 20
# CPU threads for the Viterbi: its per-step ops are small ([batch, 2^L]); with two threads on the shared
# two-core machine (load ~5) L = 8 ran at 2,000 weights/s against 105,000 with one (benchmarks/trellis_quality.py)
ENCODE_THREADS = 1
SEED = 0


def tile_batch(L: int) -> int:
    return max(1, HISTORY_BYTES // (fmt.T * 4 << L))


@contextmanager
def _threads(device: torch.device):
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(ENCODE_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# -- Viterbi over a batch of tiles ----------------------------------------------------------------------

def viterbi(x: torch.Tensor, table: torch.Tensor, bits: int, start: torch.Tensor | None = None):
    """Forward pass. x [B, T] targets (the table's units), table [2^L] = value(s); ``start`` int [B]: allow
    only s_0 with s_0 >> bits == start. Returns (final cost [B, 2^L], the costs after every step: T tensors
    [B, 2^L], which ``traceback`` reads the best predecessors from; the minimum is taken values-only, which
    torch does about 10x faster than a minimum with indices on this strided view)."""
    B, T = x.shape
    S = table.numel()
    nk, J = 1 << bits, S >> bits
    f2 = table * table
    C = torch.addcmul(f2[None], x[:, :1], table[None], value=-2)  # (x - f)² - x², per state
    if start is not None:
        ok = (torch.arange(S, device=x.device)[None] >> bits) == start[:, None]
        C = C.masked_fill(~ok, float("inf"))
    history = [C]
    for t in range(1, T):
        M = C.view(B, nk, J).amin(1)  # best predecessor cost of every key j = s >> bits
        C = torch.addcmul(f2[None], x[:, t:t + 1], table[None], value=-2).view(B, J, nk).add_(M[:, :, None]).view(B, S)
        history.append(C)
    return C, history


def traceback(history: list[torch.Tensor], end: torch.Tensor, bits: int, L: int) -> torch.Tensor:
    """States int64 [B, T] of the best path ending in state ``end`` [B]: at each step the predecessor
    (s >> bits) | (p << (L - bits)) with the lowest cost in the step before."""
    T, B = len(history), end.shape[0]
    device = end.device
    out = torch.empty(B, T, dtype=torch.int64, device=device)
    s = end.to(torch.int64)
    rows = torch.arange(B, device=device)[:, None]
    high = (torch.arange(1 << bits, device=device) << (L - bits))[None]
    for t in range(T - 1, -1, -1):
        out[:, t] = s
        if t:
            cand = (s >> bits)[:, None] | high  # [B, 2^bits]
            s = cand.gather(1, history[t - 1][rows, cand].argmin(1, keepdim=True))[:, 0]
    return out


def encode_tiles(x: torch.Tensor, bits: int, L: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """Tail-biting Viterbi of a batch of sequences x [B, 256] (integer code units) -> states int64 [B, 256]
    whose symbols form a circular stream (module doc, step 3). ``table``: another code's values [2^L] (the
    benchmark compares codes); the format's MUL1 values by default."""
    table = fmt.value_table(L, x.device) if table is None else table
    T = x.shape[1]
    half = T // 2
    with _threads(x.device):
        C, hist = viterbi(torch.roll(x, -half, dims=1), table, bits)  # position 0 sits at half
        s = traceback(hist, C.argmin(1), bits, L)
        z = s[:, half] >> bits
        del hist
        C, hist = viterbi(x, table, bits, start=z)
        low = torch.arange(table.numel(), device=x.device)[None] & ((1 << (L - bits)) - 1)
        C = C.masked_fill(low != z[:, None], float("inf"))
        return traceback(hist, C.argmin(1), bits, L)


def _encode_batched(x: torch.Tensor, bits: int, L: int, batch: int | None = None) -> torch.Tensor:
    batch = batch or tile_batch(L)
    return torch.cat([encode_tiles(x[i:i + batch], bits, L) for i in range(0, x.shape[0], batch)])


# -- incoherence and the public API ----------------------------------------------------------------------

def _signs(shape, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


def incoherence(W: torch.Tensor, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [B, N, K] fp32 -> (target X [B, N, K] in code units, suh fp16 [B, K], svh fp16 [B, N]) (step 1)."""
    B, N, K = W.shape
    gen = torch.Generator().manual_seed(seed)
    r = W.pow(2).mean(-1).sqrt().clamp_min(1e-12)  # [B, N]
    c = (W / r[..., None]).pow(2).mean(-2).sqrt().clamp_min(1e-6)  # [B, K]
    c = c / c.mean(-1, keepdim=True)
    sv, su = _signs((B, N), gen).to(W.device), _signs((B, K), gen).to(W.device)
    unit = fmt.rotate(W / (r * sv)[..., None] / (c * su)[:, None, :])
    a = unit.pow(2).mean((-1, -2)).sqrt().clamp_min(1e-12) / fmt.VALUE_RMS  # weight per code unit
    root = math.sqrt(fmt.VALUE_RMS)
    suh = (su * c / root).to(fmt.SCALE_DTYPE)
    svh = (sv * r * a[:, None] * root).to(fmt.SCALE_DTYPE)
    denom = svh.float()[..., None] * suh.float()[:, None, :]
    X = fmt.rotate(torch.where(denom != 0, W / denom, torch.zeros_like(W)))
    return X, suh, svh


def trellis(w: torch.Tensor, H: torch.Tensor | None = None, *, bits: int = 2, L: int = fmt.L_DEFAULT,
            damp: float = 0.01, seed: int = SEED, batch: int | None = None) -> TrellisTensor:
    """Encode ``w`` [.., N, K] (``H`` [.., K, K] makes it Hessian-aware, LDLQ); the module doc has the steps."""
    fmt.check_params(bits, L)
    *lead, n, k = w.shape
    fmt.check_shape(n, k, "trellis")
    W = w.float().reshape(-1, n, k)
    B = W.shape[0]
    if H is not None:
        W, H = W.clone(), H.float().reshape(B, k, k).clone()
        fix_dead_inputs(W, H)
    X, suh, svh = incoherence(W, seed)
    if H is None:
        s = _encode_batched(fmt.to_tiles(X).reshape(-1, fmt.T), bits, L, batch)
        states = s.reshape(B, n // fmt.TILE, k // fmt.TILE, fmt.T)
    else:
        states = _ldlq(X, _rotated_hessian(H, suh), bits, L, damp, batch)
    words = fmt.pack_symbols(fmt.symbols_from_states(states, bits), bits)
    tt = TrellisTensor(words, suh, svh, bits, L)
    if not lead:
        return tt.select(0)
    return TrellisTensor(words.reshape(*lead, *words.shape[1:]), suh.reshape(*lead, k), svh.reshape(*lead, n), bits, L)


def _rotated_hessian(H: torch.Tensor, suh: torch.Tensor) -> torch.Tensor:
    """H_K diag(suh) H diag(suh) H_K for H [B, K, K] (the Hessian of the rotated inputs)."""
    s = suh.float()
    Hs = H * s[:, :, None] * s[:, None, :]
    return fmt.rotate(Hs)


def _ldlq(X: torch.Tensor, Hq: torch.Tensor, bits: int, L: int, damp: float, batch: int) -> torch.Tensor:
    """Step 4: X [B, N, K] targets, Hq [B, K, K] -> states int64 [B, N/16, K/16, 256]."""
    B, N, K = X.shape
    X = X.clone()
    U = inverse_cholesky(Hq, damp)
    eye = torch.eye(fmt.TILE, device=X.device)
    out = torch.empty(B, N // fmt.TILE, K // fmt.TILE, fmt.T, dtype=torch.int64, device=X.device)
    table = fmt.value_table(L, X.device)
    for j in range(K // fmt.TILE):
        i1, i2 = j * fmt.TILE, (j + 1) * fmt.TILE
        strip = X[:, :, i1:i2]  # [B, N, 16]: N/16 tiles per matrix, rows r = n % 16, t = 16 r + c
        s = _encode_batched(strip.reshape(-1, fmt.T), bits, L, batch)
        out[:, :, j] = s.reshape(B, N // fmt.TILE, fmt.T)
        q = table[s].reshape(B, N, fmt.TILE)
        Ub = U[:, i1:i2, i1:i2]
        E = (strip - q) @ torch.linalg.solve_triangular(Ub, eye.expand(B, -1, -1), upper=True)
        if i2 < K:
            X[:, :, i2:] -= E @ U[:, i1:i2, i2:]
    return out
