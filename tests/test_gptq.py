"""GPTQ: beats RTN on the calibration output, matches a slow float64 reference, batches over experts."""

import pytest
import torch

from quantkit.quant.gptq import gptq
from quantkit.quant.rtn import grid_for_range, quantize_to_grid, rtn


def correlated_inputs(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    return (torch.randn(n, k, generator=g) @ mix) * (1 + 3 * torch.rand(k, generator=g))  # correlated, uneven scales


def reference_gptq(w, X, bits, group_size, symmetric, damp=0.01):
    """Unblocked GPTQ in float64 with explicit inverse-Hessian downdates (no Cholesky trick)."""
    W = w.double().clone()
    H = (X.double().T @ X.double())
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    N, K = W.shape
    Q = torch.zeros_like(W)
    scale = zero = None
    for c in range(K):
        if c % group_size == 0:
            chunk = W[:, c:c + group_size]
            scale, zero = grid_for_range(chunk.amin(-1).float(), chunk.amax(-1).float(), bits, symmetric, torch.float32)
        q = quantize_to_grid(W[:, c].float(), scale, zero, bits).double()
        deq = (q - (zero.double() if zero is not None else 0)) * scale.double()
        Q[:, c] = deq
        err = (W[:, c] - deq) / Hinv[c, c]
        W[:, c + 1:] -= err[:, None] * Hinv[c, c + 1:][None, :]
        Hinv = Hinv - Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]  # eliminate column c
    return Q


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (2, 32, False), (3, 64, False)])
def test_matches_float64_reference(bits, group, sym):
    X = correlated_inputs(512, 128)
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(1))
    ours = gptq(w, X.T @ X, bits, group, sym, block_size=32, scale_dtype=torch.float32).dequantize(torch.float64)
    ref = reference_gptq(w, X, bits, group, sym)
    mismatch = (ours - ref).abs() > 1e-4
    assert mismatch.float().mean() < 0.01  # fp32 vs fp64 may flip a rare tie, nothing more
    out_ours, out_ref = X.double() @ ours.T, X.double() @ ref.T
    assert ((out_ours - out_ref).norm() / out_ref.norm()) < 0.01


@pytest.mark.parametrize("bits,group,sym,act_order", [(4, 32, True, False), (2, 64, False, False), (4, 32, True, True), (2, 32, False, True)])
def test_reduces_output_error_vs_rtn_on_the_same_grid(bits, group, sym, act_order):
    X = correlated_inputs(1024, 256, seed=bits)
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    H = X.T @ X
    q_gptq = gptq(w, H, bits, group, sym, act_order=act_order)
    q_rtn = rtn(w, bits, group, sym)
    err = lambda q: ((X @ q.dequantize().T - X @ w.T).pow(2).mean() / (X @ w.T).pow(2).mean()).item()
    assert err(q_gptq) < 0.9 * err(q_rtn), (err(q_gptq), err(q_rtn))
    if act_order:  # static groups: the grid is RTN's, only the codes differ
        assert torch.equal(q_gptq.scales, q_rtn.scales)


def test_batched_experts_equal_one_by_one_and_dead_inputs():
    X = correlated_inputs(256, 64)
    X[:, 5] = 0  # an input never seen
    w = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(3))
    H = torch.stack([X.T @ X, 2 * X.T @ X, X.T @ X + torch.eye(64)])
    H[0, 5, 5] = 0.0
    batched = gptq(w, H, 4, 32, False)
    for e in range(3):
        one = gptq(w[e], H[e], 4, 32, False)
        assert torch.equal(one.codes, batched.codes[e]) and torch.equal(one.scales, batched.scales[e])
    assert torch.isfinite(batched.scales.float()).all()


def test_cholesky_retry_on_singular_hessian():
    w = torch.randn(8, 32)
    H = torch.ones(32, 32)  # rank one: needs more dampening
    qt = gptq(w, H, 4, 32, True, damp=1e-8)
    assert torch.isfinite(qt.dequantize()).all()


@pytest.mark.parametrize("act_order", [False, True])
def test_clip_search_grid_lowers_output_error_with_outliers(act_order):
    X = correlated_inputs(1024, 256, seed=5)
    g = torch.Generator().manual_seed(6)
    w = torch.randn(64, 256, generator=g)
    w[torch.rand(64, 256, generator=g) < 0.01] *= 8  # heavy tails: min-max grids waste levels
    H = X.T @ X
    err = lambda q: ((X @ q.dequantize().T - X @ w.T).pow(2).mean() / (X @ w.T).pow(2).mean()).item()
    plain = gptq(w, H, 4, 64, True, act_order=act_order)
    mse = gptq(w, H, 4, 64, True, act_order=act_order, clip_search=True)
    assert err(mse) < 0.99 * err(plain), (err(mse), err(plain))


def test_fp_target_aims_gptq_at_the_fp_outputs():
    from quantkit.quant.gptq import fp_target

    X = correlated_inputs(2048, 128, seed=7)  # the fp model's inputs
    Xq = X + 0.3 * correlated_inputs(2048, 128, seed=8)  # the quantized model's inputs drift from them
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(9))
    H, M = Xq.T @ Xq, X.T @ Xq
    assert torch.equal(fp_target(w, H, H), w)  # no drift: W itself, dampening or not
    asym = lambda q: (X @ w.T - Xq @ q.dequantize().T).pow(2).sum().item()
    plain, aimed = gptq(w, H, 4, 64, True), gptq(fp_target(w, H, M), H, 4, 64, True)
    assert asym(aimed) < 0.8 * asym(plain), (asym(aimed), asym(plain))
