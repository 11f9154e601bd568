"""GPTQ (Frantar et al., 2022) as a pure tensor function on the same grid as RTN.

    gptq(w, H, bits, group_size, symmetric) -> QTensor

w: ``[N, K]`` or ``[E, N, K]`` (experts, batched); H: ``[K, K]`` or ``[E, K, K]`` = Σ xᵀx over calibration
inputs. Columns are quantized one at a time; each column's rounding error is spread over the columns
not yet quantized through the inverse Hessian's Cholesky factor (lazy, blocked updates). Dampening adds
``damp`` × mean(diag H) to the diagonal; a failed Cholesky retries with ten times the dampening.
Dampening is also a ridge: the larger it is, the less closely GPTQ fits the calibration inputs, and the
nearer it comes to plain rounding (H + λI tends to a multiple of I, whose inverse spreads no error).
``Rule.damp`` sets it; ``benchmarks/peers.py`` measured the trade (README, "Against llm-compressor").

Group scales/zeros are found when the column loop reaches a group's first column, from the weights as
they are then (already corrected by earlier columns). With ``act_order`` the columns are visited in
order of decreasing diag(H) but the groups stay the contiguous static ones of the packed format (their
grids fixed up front from the original weights), so no ``g_idx`` is needed.

With ``clip_search`` each group's grid is the MSE-optimal shrink of its min-max range (``rtn``'s clipping
search), each column's squared error weighted by diag(H) so the grid fits the inputs that carry energy.
"""

from __future__ import annotations

import torch

from quantkit.quant.qtensor import QTensor
from quantkit.quant.rtn import clip_grid, grid_for_range, quantize_to_grid, rtn


def fix_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> None:
    """In place, W [B, N, K] and H [B, K, K]: inputs calibration never saw (H_kk = 0) get H_kk = 1 and zero
    weights, so H is invertible and the unseen (irrelevant) weights cost nothing."""
    dead = torch.diagonal(H, dim1=-2, dim2=-1) == 0
    b, k = dead.nonzero(as_tuple=True)
    H[b, k, k] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)


def inverse_cholesky(H: torch.Tensor, damp: float, retries: int = 4) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)^-1, batched; λ grows tenfold on failure."""
    diag_mean = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    for attempt in range(retries + 1):
        lam = damp * (10 ** attempt) * diag_mean
        L, info = torch.linalg.cholesky_ex(H + lam[..., None, None] * eye)
        if not bool(info.any()):
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if not bool(info.any()):
                return U
    raise RuntimeError(f"GPTQ: Hessian not positive definite even with dampening {damp * 10 ** retries}")


def fp_target(w: torch.Tensor, H: torch.Tensor, M: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The weights to hand GPTQ so that it aims at the fp model's outputs (GPTAQ-style asymmetric calibration).

    With x the fp model's input to this linear and x̃ the quantized model's, Σ‖W x − Q x̃‖² equals
    Σ‖W* x̃ − Q x̃‖² + const for the least-squares W* = W M H⁻¹ (H = Σ x̃ x̃ᵀ, M = Σ x x̃ᵀ): the cross term
    vanishes at W*, so plain GPTQ of W* under H minimises the asymmetric objective. Written as the correction
    W* = W + W (M − H) H⁻¹ with GPTQ's dampening on H only there, so identical streams (M = H) give W itself
    (a damped W M (H + λI)⁻¹ would shrink W instead). Not on by default: its first end-to-end run on the demo
    (with the damped product form) broke the model, and this form, measured end to end on the dense SmolLM2
    (``benchmarks/peers.py``, damp 1), gave gap 36.4 against 7.84 without it: W M H⁻¹ is itself fitted to the
    calibration text.
    w [.., N, K], H and M [.., K, K] -> [.., N, K] fp32."""
    H, w = H.float(), w.float()
    lam = damp * torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-8)
    Hd = H + lam[..., None, None] * torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    return w + torch.linalg.solve(Hd, (w @ (M.float() - H)).transpose(-2, -1)).transpose(-2, -1)


def gptq(w: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool, *, block_size: int = 128,
         damp: float = 0.01, act_order: bool = False, clip_search: bool = False,
         scale_dtype: torch.dtype | None = None) -> QTensor:
    """Quantize ``w`` [.., N, K] with Hessian ``H`` [.., K, K] onto the grouped grid; see the module doc."""
    squeeze = w.dim() == 2
    if squeeze:
        w, H = w[None], H[None]
    E, N, K = w.shape
    assert H.shape == (E, K, K), (w.shape, H.shape)
    assert K % group_size == 0, (K, group_size)
    scale_dtype = scale_dtype or (w.dtype if w.dtype.is_floating_point else torch.float32)
    G = K // group_size
    W = w.float().clone()
    H = H.float().clone()

    fix_dead_inputs(W, H)

    scales = torch.empty(E, N, G, dtype=scale_dtype, device=w.device)
    zeros = None if symmetric else torch.empty(E, N, G, dtype=torch.float32, device=w.device)
    if act_order:  # static groups from the original weights, then visit columns by decreasing diag(H)
        static = rtn(W, bits, group_size, symmetric, clip_search=clip_search, scale_dtype=scale_dtype,
                     clip_weight=torch.diagonal(H, dim1=-2, dim2=-1)[:, None, :])
        scales.copy_(static.scales)
        if zeros is not None:
            zeros.copy_(static.zeros.float())
        perm = torch.argsort(torch.diagonal(H, dim1=-2, dim2=-1), dim=-1, descending=True)
        W = torch.gather(W, 2, perm[:, None, :].expand(E, N, K))
        H = torch.gather(torch.gather(H, 1, perm[:, :, None].expand(E, K, K)), 2, perm[:, None, :].expand(E, K, K))
    else:
        perm = None

    U = inverse_cholesky(H, damp)
    Q = torch.empty_like(W)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1, U1 = W[:, :, i1:i2].clone(), U[:, i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if perm is None:
                g = col // group_size
                if col % group_size == 0:  # the group's grid from the weights as they are now
                    chunk = torch.cat([W1[:, :, i:i + group_size], W[:, :, i2:col + group_size]], dim=-1)
                    lo, hi = chunk.amin(-1), chunk.amax(-1)
                    if clip_search:
                        d = torch.diagonal(H, dim1=-2, dim2=-1)[:, None, col:col + group_size]
                        s, z = clip_grid(chunk, lo[..., None], hi[..., None], bits, symmetric, scale_dtype, d)
                        s, z = s[..., 0], None if z is None else z[..., 0]
                    else:
                        s, z = grid_for_range(lo, hi, bits, symmetric, scale_dtype)
                    scales[:, :, g] = s
                    if zeros is not None:
                        zeros[:, :, g] = z
                s_col, z_col = scales[:, :, g], None if zeros is None else zeros[:, :, g]
            else:  # column ``col`` of the permuted order belongs to static group perm[:, col] // group_size
                g_idx = (perm[:, col] // group_size)[:, None, None].expand(E, N, 1)
                s_col = torch.gather(scales, 2, g_idx).squeeze(-1)
                z_col = None if zeros is None else torch.gather(zeros, 2, g_idx).squeeze(-1)
            x = W1[:, :, i]
            q = quantize_to_grid(x, s_col, z_col, bits)
            Q[:, :, col] = q
            deq = (q - (z_col if z_col is not None else 0)) * s_col.float()
            err = (x - deq) / U1[:, i, i][:, None]
            W1[:, :, i:] -= err[:, :, None] * U1[:, i, None, i:]
            Err1[:, :, i] = err
        W[:, :, i2:] -= Err1 @ U[:, i1:i2, i2:]

    if perm is not None:  # back to the original column order
        inv = torch.argsort(perm, dim=-1)
        Q = torch.gather(Q, 2, inv[:, None, :].expand(E, N, K))
    qt = QTensor(Q.to(torch.int8), scales, None if zeros is None else zeros.to(torch.int8), bits, group_size)
    if squeeze:
        qt = QTensor(qt.codes[0], qt.scales[0], None if qt.zeros is None else qt.zeros[0], bits, group_size)
    return qt
