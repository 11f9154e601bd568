"""AWQ-style activation-aware scaling (Lin et al., 2023) as a transform applied before any quantizer.

For a smoothing group (linears that share one input x, e.g. q/k/v after the input norm) we look for a
per-input-channel scale s = mean|x|^α (normalised by sqrt(max·min)) over a grid of α, scaling the
weights' input columns by s and folding 1/s into whatever produced x (a norm's weight, or the rows of
the previous linear). The quantized output is then Q(W·diag(s))·diag(1/s)·x.

We score each α by the exact output error on the calibration inputs, computed from the Hessian
H = Σ xᵀx alone:  err(s) = Σ_j tr(ΔW_j H_j ΔW_jᵀ),  ΔW_j = Q(W_j diag(s)) diag(1/s) − W_j.
α = 0 (s = 1, plain quantization) is in the grid, so the chosen scale never scores worse than it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

ALPHAS = tuple(i / 20 for i in range(20))  # 0.00, 0.05, ..., 0.95


def scale_from_alpha(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    s = mean_abs.float().clamp_min(1e-5).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


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
                 expand: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, float, list[float]]:
    """Best s over the α grid: (s [K], α, errors per α). ``expand`` maps s onto the weights' input
    columns when they are not one to one (v's channels feed several q heads' columns of o)."""
    expand = expand or (lambda t: t)
    errors = [group_error(members, expand(scale_from_alpha(mean_abs, a)), quant) for a in alphas]
    best = min(range(len(alphas)), key=errors.__getitem__)
    return scale_from_alpha(mean_abs, alphas[best]), alphas[best], errors


def scale_hessian(H: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The Hessian of x / s: diag(1/s) H diag(1/s)."""
    inv = 1.0 / s.float()
    return H * inv[:, None] * inv[None, :]
