"""AWQ-style activation-aware scaling (Lin et al., 2023) as a transform applied before any quantizer.

For a smoothing group (linears that share one input x, e.g. q/k/v after the input norm) we look for a
per-input-channel scale s = mean|x|^α (normalised by sqrt(max·min)) over a grid of α, scaling the
weights' input columns by s and folding 1/s into whatever produced x (a norm's weight, or the rows of
the previous linear). The quantized output is then Q(W·diag(s))·diag(1/s)·x.

We score each α by the exact output error on the calibration inputs, computed from the Hessian
H = Σ xᵀx alone:  err(s) = Σ_j tr(ΔW_j H_j ΔW_jᵀ),  ΔW_j = Q(W_j diag(s)) diag(1/s) − W_j.
α = 0 (s = 1, plain quantization) is in the grid, so the chosen scale never scores worse than it.

Block-output scoring (``Rule.awq_block``, on by default; llm-compressor scores a mapping at its balance
layers' lowest common ancestor): the best candidates by that error, and s = 1, are scored again by the mean
squared change of the attention block's output (q/k/v) or the MLP's output (gate/up, routed experts
included) on a few calibration windows, the other weights fp; that sees the softmax, silu(g)·u and the down
projection, which the per-linear error weighs equally. v→o and up→down stay on the Hessian error, which is
exact for them.

Weight-aware candidates ("duo" scaling, as llm-compressor's AWQ offers): s = mean|x|^α / mean|ŵ|^(1-α),
ŵ = |W| / its group's max |W| averaged over output rows per input column, so columns whose weights sit
far below their group's maximum (and lose most to rounding) are scaled up. Both families are scored by
the same output error and the best candidate wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ALPHAS = tuple(i / 20 for i in range(20))  # 0.00, 0.05, ..., 0.95


def scale_from_alpha(mean_abs: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    s = mean_abs.float().clamp_min(1e-5).pow(alpha)
    if w_mean is not None:
        s = (s / (w_mean.float().pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
    return s / (s.max() * s.min()).sqrt()


def weight_mean(weights: Sequence[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over every output row (and expert) of |W| / max|W| of its group, per input column: [K]."""
    total, rows = 0.0, 0
    for w in weights:
        k = w.shape[-1]
        wg = w.float().abs().reshape(-1, k // group_size, group_size)
        wg = wg / (wg.amax(-1, keepdim=True) + 1e-6)
        total = total + wg.reshape(-1, k).sum(0)
        rows += wg.shape[0]
    return total / rows


def group_error(members: Sequence[tuple[torch.Tensor, torch.Tensor]], s: torch.Tensor,
                quant: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Σ tr(ΔW H ΔWᵀ) over (W [.., N, K], H [.., K, K]) members for input scale s [K]."""
    total = 0.0
    for w, H in members:
        w = w.float()
        deq = quant(w * s) / s
        D = deq - w
        total += float(((D @ H) * D).sum())
    return total


def search_scale(members: Sequence[tuple[torch.Tensor, torch.Tensor]], mean_abs: torch.Tensor,
                 quant: Callable[[torch.Tensor], torch.Tensor], alphas: Sequence[float] = ALPHAS,
                 expand: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 w_mean: torch.Tensor | None = None, rescore: Callable[[torch.Tensor], float] | None = None,
                 top: int = 8) -> tuple[torch.Tensor, float | str, list[float]]:
    """Best s over the α grid: (s [K], α, errors per candidate). ``expand`` maps s onto the weights' input
    columns when they are not one to one (v's channels feed several q heads' columns of o). With
    ``w_mean`` [K] (``weight_mean``) the weight-aware candidates (α > 0) are scored too; one of them
    winning is reported as the string ``"duo:α"``. With ``rescore`` (s -> error at a block's output), the
    ``top`` candidates by the Hessian error and α = 0 are scored again by it, and its minimum wins."""
    expand = expand or (lambda t: t)
    cands = [(a, None) for a in alphas] + ([(a, w_mean) for a in alphas if a > 0] if w_mean is not None else [])
    errors = [group_error(members, expand(scale_from_alpha(mean_abs, a, wm)), quant) for a, wm in cands]
    best = min(range(len(cands)), key=errors.__getitem__)
    if rescore is not None:
        shortlist = sorted(range(len(cands)), key=errors.__getitem__)[:top]
        shortlist += [i for i, (a, wm) in enumerate(cands) if a == 0 and wm is None and i not in shortlist]
        at_block = {i: rescore(expand(scale_from_alpha(mean_abs, *cands[i]))) for i in shortlist}
        best = min(at_block, key=at_block.__getitem__)
    a, wm = cands[best]
    return scale_from_alpha(mean_abs, a, wm), a if wm is None else f"duo:{a:.2f}", errors


def scale_hessian(H: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hessian of x / s: diag(1/s) H diag(1/s)."""
    inv = 1.0 / s.float()
    return H * inv[:, None] * inv[None, :]
