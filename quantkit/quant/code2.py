"""Encoder for the 2-bit convolutional code (CCQ / FastDeploy WINT2; layout and decoder: ``quantkit.format.wint2``).

    code2(w, H=None) -> Code2Tensor        w: [N, K] or [E, N, K] (quantkit orientation), K % 64 == 0

What the decoder gives us to choose, per column n (one output of the weight):
  * the codebook: ``code_scale``/``code_zp`` map byte c to v = floor(c * cs + zp + 0.5), whose four 6-bit
    windows are the 4-tuple q(c) in [-32, 31]^4. The 256 tuples of one (cs, zp) are points of a rank-1
    lattice (a Kronecker line) in the 4-D cube: every window is close to uniform, so the codebook has
    uniform density, and only its geometry (how evenly 256 points fill the cube) depends on (cs, zp).
  * the scales: a bf16 super scale per column times a 4-bit local scale l in 0..15 per 64 inputs.
  * one byte per 4 consecutive inputs.

The encoder (pure functions, vectorised over columns and experts, chunked to bound memory):
  1. Codebook pool (``codebook_pool``): a seeded set of candidate (cs, zp) pairs, screened once per process
     on unit-Gaussian 4-tuples (with the best plain scale for each); the best ``pool`` survive, each with
     its Gaussian-optimal step ``alpha``. cs and zp are multiples of 2^-8 (cs < 128, cs*255 + zp < 2^15),
     so the decoder's fp32 affine map is exact in any evaluation order (FMA or not).
  2. Per column and pool codebook: super scale from the largest 64-group RMS, local scale per group
     searched around its RMS-optimal value, nearest codeword per 4-tuple by exhaustive search
     (||x||² - 2a x·q + a²||q||² over all 256 codes); the codebook with the least column error wins
     (selection gain).
  3. Alternating refinement with the chosen codebook: refit the super scale by least squares given codes
     and local scales (then round to bf16), re-search local scales and codes; keep a step only if the
     column error falls.
  4. With a Hessian H = Σ xᵀx (``H`` [K, K] or [E, K, K]): scales and codebooks come from steps 1-3, then
     the codes are chosen again GPTQ-style, one 4-input block at a time, each by the nearest codeword
     under the block's inverse-Hessian metric, and its error spread over the inputs not yet coded through
     the Cholesky factor U of H⁻¹ (E = δ U_BB⁻¹, W_rest -= E U_B,rest), which is the exact OBS update for
     a jointly quantized block.
"""

from __future__ import annotations

import functools

import torch

from quantkit.format.wint2 import (GROUP, LOCAL_MAX, PACK, SUPER_DTYPE, affine_values, check_k, pack_local_scales,
                                   windows)
from quantkit.quant.gptq import fix_dead_inputs, inverse_cholesky
from quantkit.quant.qtensor import Code2Tensor

TUPLES = GROUP // PACK  # 4-tuples per 64-group
CODES = 256
DYADIC = 256.0  # code_scale / code_zp are multiples of 1 / DYADIC
V_LIMIT = 32767  # largest v the encoder lets the affine map reach (windows read bits 0..14)
HEADROOM = 14  # the largest group's RMS-optimal local scale (15 leaves room to scale up)
POOL = 4  # codebooks tried per column by default
SCREEN = 128  # candidate codebooks screened for the pool
ROW_CHUNK = 64  # rows (columns of W, over all experts) encoded at once: bounds the [rows, K/4, 256] work


# -- codebooks ------------------------------------------------------------------------------------------

def codebook(code_scale: torch.Tensor, code_zp: torch.Tensor) -> torch.Tensor:
    """q tuples of every byte: code_scale/code_zp [..] -> fp32 [.., 256, 4] (through the reference windows)."""
    cs, zp = code_scale.reshape(-1), code_zp.reshape(-1)
    codes = torch.arange(CODES, device=cs.device)[:, None].expand(CODES, cs.numel())  # every byte, every codebook
    q = windows(affine_values(codes, cs, zp))  # [1024, M]: rows 4c..4c+3 are byte c's inputs
    return q.reshape(CODES, PACK, -1).permute(2, 0, 1).reshape(*code_scale.shape, CODES, PACK).float()


def _dyadic(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * DYADIC) / DYADIC


def codebook_pool(size: int = POOL) -> tuple[torch.Tensor, ...]:
    """The ``size`` best of the screened candidate codebooks (see ``_screened``)."""
    return tuple(t[:size] for t in _screened())


@functools.lru_cache(maxsize=1)
def _screened(screen: int = SCREEN, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``screen`` seeded candidate codebooks ranked on unit-Gaussian 4-tuples, best first.

    Returns (code_scale [M], code_zp [M], Q [M, 256, 4], alpha [M], mse [M]): alpha is the step (scale
    of q) that is best for unit variance, mse the per-weight error it gives (plain scales, no local ones).
    """
    g = torch.Generator().manual_seed(seed)
    cs = _dyadic(116.0 + 8.0 * torch.rand(screen, generator=g, dtype=torch.float64))
    room = V_LIMIT - 1 - cs * (CODES - 1)
    zp = _dyadic(torch.rand(screen, generator=g, dtype=torch.float64) * room)
    x = torch.randn(2048, PACK, generator=g)
    Q = codebook(cs.float(), zp.float())  # [S, 256, 4]
    alphas = torch.linspace(0.055, 0.07, 7)
    errs = []
    for s in range(screen):  # one candidate at a time: [4096, 256] work
        xq, qq = x @ Q[s].T, Q[s].pow(2).sum(-1)
        errs.append(torch.stack([(a * a * qq - 2 * a * xq).min(-1).values.mean() for a in alphas]))
    errs = (torch.stack(errs, 1) + x.pow(2).sum(-1).mean()) / PACK  # [A, S]
    mse, ai = errs.min(0)
    keep = torch.argsort(mse)
    return cs[keep].float(), zp[keep].float(), Q[keep], alphas[ai[keep]], mse[keep]


# -- the search kernels ----------------------------------------------------------------------------------

def _nearest(xq: torch.Tensor, qq: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest scaled codeword: xq [.., T, 256] = x·q, qq [.., 1, 256] = |q|², a [..] scale per tuple set.
    Returns (err without |x|² [.., T], code [.., T])."""
    a = a[..., None, None]
    return (a * a * qq - 2 * a * xq).min(-1)


def _search_local(X, xq, qq, S, l_center, spread: int):
    """Per 64-group, the local scale in l_center ± spread (0..15) and codes with the least error.
    X [R, G, 16, 4], xq [R, G, 16, 256], qq [R, 1, 1, 256], S [R], l_center [R, G] int.
    Returns (group error [R, G], l [R, G], codes [R, G, 16])."""
    xx = X.pow(2).sum((-1, -2))
    best_e = best_l = best_c = None
    for off in range(-spread, spread + 1):
        lv = (l_center + off).clamp(0, LOCAL_MAX)
        e, c = _nearest(xq, qq, lv.float() * S[:, None])
        e = e.sum(-1) + xx
        if best_e is None:
            best_e, best_l, best_c = e, lv, c
            continue
        better = e < best_e
        best_e = torch.where(better, e, best_e)
        best_l = torch.where(better, lv, best_l)
        best_c = torch.where(better[..., None], c, best_c)
    return best_e, best_l, best_c


def _bf16_scale(s: torch.Tensor) -> torch.Tensor:
    return s.clamp_min(1e-30).to(SUPER_DTYPE).float()


def _encode_rows(X: torch.Tensor, pool: tuple, iters: int):
    """Steps 2-3 of the module doc for rows X [R, G, 16, 4]. Returns (pool index [R], S [R] (bf16 values),
    l [R, G] int, codes [R, G, 16] int64, error [R])."""
    cs, zp, Q, alpha, _ = pool
    rms = X.pow(2).mean((-1, -2)).sqrt()  # [R, G]
    best = None
    for m in range(Q.shape[0]):
        S = _bf16_scale(alpha[m] * rms.amax(-1) / HEADROOM)
        l0 = torch.round(alpha[m] * rms / S[:, None]).long().clamp(1, LOCAL_MAX)
        xq = X @ Q[m].T
        e, l, c = _search_local(X, xq, Q[m].pow(2).sum(-1)[None, None, None], S, l0, 1)
        err = e.sum(-1)
        cand = (torch.full_like(err, m, dtype=torch.long), S, l, c, err)
        if best is None:
            best = cand
            continue
        better = err < best[4]
        best = tuple(torch.where(better.reshape(-1, *[1] * (b.dim() - 1)), n, b) for n, b in zip(cand, best))
    mi, S, l, c, err = best
    Qr = Q[mi]  # [R, 256, 4] each row's own codebook
    xq = torch.einsum("rgtd,rcd->rgtc", X, Qr)
    qq = Qr.pow(2).sum(-1)[:, None, None, :]
    for _ in range(iters):
        q = torch.gather(Qr[:, None].expand(-1, c.shape[1], -1, -1), 2, c[..., None].expand(-1, -1, -1, PACK))
        xdotq, qnorm = (X * q).sum((-1, -2)), q.pow(2).sum((-1, -2))  # [R, G]
        lf = l.float()
        S_new = _bf16_scale((lf * xdotq).sum(-1) / (lf * lf * qnorm).sum(-1).clamp_min(1e-30))
        l_star = torch.round(xdotq / (S_new[:, None] * qnorm).clamp_min(1e-30)).long().clamp(0, LOCAL_MAX)
        e, l2, c2 = _search_local(X, xq, qq, S_new, l_star, 1)
        err2 = e.sum(-1)
        better = err2 < err
        S, err = torch.where(better, S_new, S), torch.where(better, err2, err)
        l, c = torch.where(better[:, None], l2, l), torch.where(better[:, None, None], c2, c)
    return mi, S, l, c, err


# -- public API ----------------------------------------------------------------------------------------

def code2(w: torch.Tensor, H: torch.Tensor | None = None, *, pool: int = POOL, iters: int = 2,
          damp: float = 0.01, row_chunk: int = ROW_CHUNK) -> Code2Tensor:
    """Encode ``w`` [.., N, K] into the 2-bit code (see the module doc); ``H`` [.., K, K] makes it
    Hessian-aware. The result decodes (``.dequantize()``) to [.., N, K]."""
    *lead, n, k = w.shape
    check_k(k, "code2")
    W = w.float().reshape(-1, n, k)
    B, G = W.shape[0], k // GROUP
    cs, zp, Q, alpha, mse = (t.to(w.device) for t in codebook_pool(pool))
    rows = W.reshape(B * n, G, TUPLES, PACK)
    out = [_encode_rows(rows[i:i + row_chunk], (cs, zp, Q, alpha, mse), iters) for i in range(0, B * n, row_chunk)]
    mi, S, l, codes, _ = (torch.cat(parts) for parts in zip(*out))
    if H is not None:
        scale = (l.float() * S[:, None]).reshape(B, n, G)
        codes = _hessian_codes(W, H.float().reshape(B, k, k), Q[mi].reshape(B, n, CODES, PACK), scale, damp)
        codes = codes.reshape(B * n, G, TUPLES)
    quant_weight = codes.reshape(B, n, k // PACK).to(torch.uint8).transpose(1, 2).contiguous()
    weight_scale = pack_local_scales(l.reshape(B, n, G).to(torch.uint8).transpose(1, 2)).contiguous()
    ct = Code2Tensor(quant_weight, weight_scale, S.reshape(B, n).to(SUPER_DTYPE), cs[mi].reshape(B, n), zp[mi].reshape(B, n))
    return ct.select(0) if not lead else Code2Tensor(*(t.reshape(*lead, *t.shape[1:]) for t in ct.tensors().values()))


def _hessian_codes(W: torch.Tensor, H: torch.Tensor, Qcol: torch.Tensor, scale: torch.Tensor, damp: float,
                   block: int = 128) -> torch.Tensor:
    """GPTQ over 4-input blocks with fixed scales: W [B, N, K], H [B, K, K], Qcol [B, N, 256, 4] (each
    column's codebook), scale [B, N, K/64] (local * super). Returns codes [B, N, K/4] (int64)."""
    B, N, K = W.shape
    W, H = W.clone(), H.clone()
    fix_dead_inputs(W, H)
    U = inverse_cholesky(H, damp)
    codes = torch.empty(B, N, K // PACK, dtype=torch.long, device=W.device)
    eye = torch.eye(PACK, device=W.device)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1, U1 = W[:, :, i1:i2].clone(), U[:, i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for j in range(0, i2 - i1, PACK):
            col = i1 + j
            Ub = U1[:, j:j + PACK, j:j + PACK]  # [B, 4, 4] upper triangular
            Uinv = torch.linalg.solve_triangular(Ub, eye.expand(B, -1, -1), upper=True)
            a = scale[:, :, col // GROUP]  # [B, N]
            x = W1[:, :, j:j + PACK]
            xt = x @ Uinv  # the block's error metric: |δ U_BB⁻¹|²
            qt = torch.einsum("bncd,bde->bnce", Qcol, Uinv)
            d = a[..., None] ** 2 * qt.pow(2).sum(-1) - 2 * a[..., None] * torch.einsum("bnd,bncd->bnc", xt, qt)
            c = d.argmin(-1)
            codes[:, :, col // PACK] = c
            deq = a[..., None] * torch.gather(Qcol, 2, c[..., None, None].expand(-1, -1, 1, PACK)).squeeze(2)
            E = (x - deq) @ Uinv
            W1[:, :, j + PACK:] -= E @ U1[:, j:j + PACK, j + PACK:]
            Err1[:, :, j:j + PACK] = E
        W[:, :, i2:] -= Err1 @ U[:, i1:i2, i2:]
    return codes
