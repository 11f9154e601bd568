"""The routing kernel (Triton) against ERNIE's routing in torch (``layers.route``): the same experts and the
same weights, for decode and prefill token counts, split over H or not, router widths that are and are not
powers of two, several top-k, bf16 / fp16 / fp32 activations, and a correction bias that changes the choice."""

import pytest
import torch
from kernel_cases import DEV, poison  # noqa: F401

from quantkit.kernels import dispatch
from quantkit.kernels.routing import route as triton_route
from quantkit.model.layers import route

# (T, E, top_k, H, dtype)
CASES = [(1, 64, 6, 2560, torch.bfloat16), (2, 8, 2, 96, torch.float32), (3, 5, 5, 64, torch.float16),
         (16, 64, 6, 200, torch.bfloat16), (33, 128, 8, 128, torch.bfloat16), (40, 1, 1, 48, torch.float32)]


@pytest.mark.parametrize("t, e, k, hdim, dtype", CASES)
def test_routing_kernel_matches_torch(t, e, k, hdim, dtype):
    gen = torch.Generator().manual_seed(t * 1000 + e)
    x = torch.randn(t, hdim, generator=gen).to(DEV, dtype)
    w = (torch.randn(e, hdim, generator=gen) * 2 / hdim**0.5).to(DEV)
    bias = (0.05 * torch.randn(1, e, generator=gen)).to(DEV)  # large enough to reorder some choices
    ids, weights = triton_route(x, w, bias, k, 1e-12)
    ref_ids, ref_w = route(x, w, bias, k, 1e-12)
    assert ids.dtype == torch.int64 and weights.dtype == torch.float32
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)
    assert all(int(c.abs().sum()) == 0 for c in dispatch._COUNTERS.values())  # split over H: counters reset


def test_bias_changes_the_choice_as_in_torch():
    """A bias that pushes expert 3 to the top: chosen, but weighted by its unbiased probability."""
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)).to(DEV)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(2)).to(DEV) / 8
    bias = torch.zeros(1, 8, device=DEV)
    bias[0, 3] = 10.0
    ids, weights = triton_route(x, w, bias, 2, 1e-12)
    ref_ids, ref_w = route(x, w, bias, 2, 1e-12)
    assert bool((ids[:, 0] == 3).all()) and torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)


def test_bad_top_k():
    with pytest.raises(ValueError, match="top_k"):
        triton_route(torch.zeros(1, 16, device=DEV), torch.zeros(4, 16, device=DEV), torch.zeros(1, 4, device=DEV), 5,
                     1e-12)
