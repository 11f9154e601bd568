"""A bit budget for the trellis code: which K (bits per weight, 2/3/4) each routed-expert unit gets.

    predicted_loss(w, H, bits, L) -> [E]       the proxy loss tr(ΔW H ΔWᵀ) the trellis encoder is expected to leave
    allocate(units, bits_per_weight) -> {name: K}   greedy knapsack over the units' K

Sensitivity = the calibration proxy loss the pipeline already reports per module (``layer_quant.relative_error``'s
numerator, tr(ΔW H ΔWᵀ) with H = Σ xᵀx over the calibration tokens), *predicted* for every K from the
weights and Hessian instead of encoding each tensor three times (the Viterbi is the whole cost of a run):

    E[tr(ΔW H ΔWᵀ)] = D_K · Σ_n svh_n² · Σ_b ‖U_bb⁻¹‖_F²

with ``svh``/``suh`` the format's incoherence scales (``quantkit.quant.trellis.incoherence``), U the upper
Cholesky factor of the rotated Hessian's inverse that LDLQ feeds the error forward with, U_bb its 16×16
diagonal blocks (LDLQ's strips: the loss a strip's residual δ_b costs is ‖δ_b U_bb⁻¹‖², GPTQ's identity), and
D_K the code's own mean squared error per weight in code units at (K, L), *measured* (``code_mse``: the
tail-biting Viterbi on unit-RMS Gaussian sequences, as the rotated weights are Gaussian-like). Without LDLQ
(plain encoder, or an expert too starved for its Hessian) the error is not fed forward and the last factor
is tr(H_q) (= Σ suh² with H = I: the plain weight MSE). ``tests/test_budget.py`` checks the prediction
against the encoder's measured proxy loss.

Allocation: every unit starts at K = 2; an upgrade K -> K+1 buys loss(K) - loss(K+1) for its extra stored
bytes (every byte the format stores, ``quantkit.format.trellis.module_specs``); the best loss per byte is
taken while it fits the budget (the others are skipped, so the mix ends within one unit's upgrade of the
budget, never above it). Since D_K falls about 4x per bit, each unit's gains per byte fall with K and the
greedy choice is the knapsack's (up to that last unit).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cache

import torch

from quantkit.format import trellis as fmt
from quantkit.quant.gptq import fix_dead_inputs, inverse_cholesky
from quantkit.quant.trellis import _rotated_hessian, encode_tiles, incoherence

CODE_MSE_SEQUENCES = 16  # unit-Gaussian sequences per (K, L) for ``code_mse``
BITS = fmt.BITS


@cache
def code_mse(bits: int, L: int, seed: int = 0) -> float:
    """The trellis code's MSE per weight, in code units, on Gaussian targets of the code's RMS (measured)."""
    x = torch.randn(CODE_MSE_SEQUENCES, fmt.T, generator=torch.Generator().manual_seed(seed + 1000 * bits + L))
    x = x * fmt.VALUE_RMS
    table = fmt.value_table(L)
    s = encode_tiles(x, bits, L, table=table)
    return (table[s] - x).pow(2).mean().item()


def loss_factor(w: torch.Tensor, H: torch.Tensor | None = None, feedback: bool = True, damp: float = 0.01) -> torch.Tensor:
    """Σ_n svh_n² · (Σ_b ‖U_bb⁻¹‖_F² with LDLQ, tr(H_q) without) per expert: w [E, N, K], H [E, K, K] -> [E] fp64.
    ``predicted_loss`` = code_mse(K, L) times this."""
    W = w.float().clone()
    E, _, K = W.shape
    Hh = torch.eye(K).expand(E, K, K).clone() if H is None else H.float().clone()
    fix_dead_inputs(W, Hh)
    _, suh, svh = incoherence(W)
    rows = svh.double().pow(2).sum(-1)
    Hq = _rotated_hessian(Hh, suh)
    if H is None or not feedback:
        return rows * torch.diagonal(Hq, dim1=-2, dim2=-1).double().sum(-1)
    U = inverse_cholesky(Hq, damp).double()
    t = fmt.TILE
    blocks = U.view(E, K // t, t, K // t, t).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # [E, K/16, 16, 16]
    eye = torch.eye(t, dtype=torch.float64).expand_as(blocks)
    inv = torch.linalg.solve_triangular(blocks, eye, upper=True)
    return rows * inv.pow(2).sum((-1, -2, -3))


def predicted_loss(w: torch.Tensor, H: torch.Tensor | None, bits: int, L: int, feedback: bool = True) -> torch.Tensor:
    """Expected tr(ΔW H ΔWᵀ) per expert [E] of ``trellis(w, H, bits=bits, L=L)`` (module doc)."""
    return code_mse(bits, L) * loss_factor(w, H, feedback)


@dataclass(frozen=True)
class Unit:
    """One budget unit: modules that share a K (a layer's routed gate+up, which servers load fused; or down)."""

    name: str
    weights: int
    bytes: dict  # K -> stored bytes of the unit at K
    loss: dict  # K -> predicted proxy loss at K


def budget_bounds(units: list[Unit]) -> tuple[float, float]:
    """Bits/weight of the units all at the smallest and all at the largest K."""
    w = sum(u.weights for u in units)
    return tuple(8 * sum(u.bytes[k] for u in units) / w for k in (BITS[0], BITS[-1]))


def allocate(units: list[Unit], bits_per_weight: float) -> dict[str, int]:
    """K per unit so that the units' stored bits per weight stay <= ``bits_per_weight`` (module doc)."""
    limit = bits_per_weight * sum(u.weights for u in units) / 8  # bytes
    choice = {u.name: BITS[0] for u in units}
    used = sum(u.bytes[BITS[0]] for u in units)
    heap = []

    def push(i: int) -> None:
        u = units[i]
        k = choice[u.name]
        if k < BITS[-1]:
            cost = u.bytes[k + 1] - u.bytes[k]
            heapq.heappush(heap, (-(u.loss[k] - u.loss[k + 1]) / cost, i, cost))

    for i in range(len(units)):
        push(i)
    while heap:
        _, i, cost = heapq.heappop(heap)
        if used + cost > limit:
            continue  # this unit stays where it is; smaller upgrades may still fit
        used += cost
        choice[units[i].name] += 1
        push(i)
    return choice
