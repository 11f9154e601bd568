"""Refuse non-finite numbers: NaN/Inf in a source tensor, or calibration activations that overflow.

Checked as the run streams (each source tensor when it is read, each layer's activation statistics when
they are captured, each layer's output hidden states): the source is read once, as the run reads it
anyway, instead of a second full pass before writing (43.7 GB for ERNIE-4.5-21B-A3B). An overflow in the
calibration forward can only be seen while it runs, so a pre-scan could not catch it anyway. The run
removes its partial output when one of these errors is raised (``QuantizeRun.run``): nothing is left
behind, no output directory and no ``.OUT.partial`` (a resume could never get past the same tensor).
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError


class NonFiniteError(QuantkitError):
    """A NaN/Inf in the source (bad input, exit 2) or in the calibration activations (exit 1)."""


def _counts(t: torch.Tensor) -> str:
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    return ", ".join(p for p in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if p) + f" of {t.numel()} values"


def check_source(names: list[str], t: torch.Tensor) -> None:
    """``t`` is one source tensor (``names == [disk name]``) or experts stacked along dim 0 (one name each)."""
    if not t.dtype.is_floating_point or bool(torch.isfinite(t).all()):
        return
    if len(names) > 1:
        e = next(i for i in range(t.shape[0]) if not bool(torch.isfinite(t[i]).all()))
        names, t = [names[e]], t[e]
    raise NonFiniteError(f"source tensor {names[0]} holds non-finite values ({_counts(t)}); "
                         "fix or replace the checkpoint (nothing was written)", exit_code=2)


def check_activations(where: str, t: torch.Tensor, what: str = "input") -> None:
    """Calibration statistics or hidden states of ``where`` (a module or layer name) must be finite."""
    if bool(torch.isfinite(t).all()):
        return
    at = where
    if t.dim() >= 2 and what == "input":  # per-expert statistics [E, K]: name the first bad expert
        e = next(i for i in range(t.shape[0]) if not bool(torch.isfinite(t[i]).all()))
        at = f"{where} (expert {e})"
    raise NonFiniteError(f"calibration activations overflow: the {what} of {at} is non-finite ({_counts(t)}) in the "
                         "fp32 forward; the source weights are finite but too large (nothing was written)", exit_code=1)
