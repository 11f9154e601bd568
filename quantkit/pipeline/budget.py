"""``--bits-per-weight B``: resolve a recipe's bit budget into per-tensor trellis rules, before any writing.

    apply_budget(ckpt, recipe, options) -> (recipe with one rule per budgeted module, report block)

The budget covers the routed experts the recipe puts in the trellis code (``format: trellis``); the other
rules stay as they are. A unit is one layer's routed gate+up (one K: servers and ``make_plan`` load them
fused) or its down projection. Bits/weight are every byte the format stores (``trellis.module_specs``), so
a budget below all-K=2 or above all-K=4 is refused at once, before the sensitivity pass.

The sensitivity pass (``quantkit.quant.budget`` has the measure and the allocation): with a calibrated
method, the calibration windows go through the *unquantized* model layer by layer (the pipeline's own
capture, same options), and each unit's Hessians give its predicted proxy loss at K = 2, 3, 4; with plain
RTN, the weights alone (H = I). It runs until the last layer with a unit; the hidden states spill to a
temporary directory under the same memory budget as the run's.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from quantkit.calib.capture import capture_layer
from quantkit.errors import UsageError
from quantkit.format import trellis as trellis_fmt
from quantkit.model.loader import Checkpoint, stream_layers
from quantkit.pipeline.layer_quant import EXPERT_CHUNK
from quantkit.quant.budget import (
    BITS,
    Unit,
    allocate,
    budget_bounds,
    code_mse,
    loss_factor,
)
from quantkit.quant.config import PlanEntry, Recipe, make_plan

LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def _units(entries: list[PlanEntry]) -> dict[str, list[PlanEntry]]:
    units: dict[str, list[PlanEntry]] = {}
    for e in entries:
        stem, _, leaf = e.module.rpartition(".")
        units.setdefault(f"{stem}.{'gate_proj+up_proj' if leaf in ('gate_proj', 'up_proj') else leaf}", []).append(e)
    return units


def _factor(w: torch.Tensor, H: torch.Tensor | None, ldlq: torch.Tensor | None) -> float:
    """Σ over experts of ``loss_factor``, EXPERT_CHUNK experts at a time; ``ldlq`` [E] bool: which experts are
    LDLQ-encoded (the others: plain encoder, no feedback); None: none has a Hessian."""
    total = 0.0
    for i in range(0, w.shape[0], EXPERT_CHUNK):
        sl = slice(i, i + EXPERT_CHUNK)
        if H is None:
            total += loss_factor(w[sl]).sum().item()
            continue
        f = loss_factor(w[sl], H[sl], feedback=True)
        plain = ~ldlq[sl]
        if plain.any():
            f[plain] = loss_factor(w[sl][plain], H[sl][plain], feedback=False)
        total += f.sum().item()
    return total


def _factors(ckpt: Checkpoint, entries: list[PlanEntry], options) -> tuple[dict[str, float], bool]:
    """Per budgeted module: Σ_experts loss_factor (module doc); and whether calibration Hessians were used."""
    from quantkit.pipeline.quantize import calibration_hidden

    calibrated = any(e.rule.method != "rtn" for e in entries)
    if not calibrated:
        return {e.module: _factor(ckpt.read_param(e.module, torch.float32), None, None) for e in entries}, False
    c, device = options.calib, options.device
    by_layer: dict[int, list[PlanEntry]] = {}
    for e in entries:
        by_layer.setdefault(int(LAYER.match(e.module).group(1)), []).append(e)
    out = {}
    with tempfile.TemporaryDirectory(prefix="quantkit-budget-") as tmp:
        hidden = calibration_hidden(ckpt, c, device, Path(tmp))
        cos, sin = (t.to(device) for t in ckpt.skeleton.rope(0, c.seq_len, "cpu"))
        for idx, layer in stream_layers(ckpt, device=device, dtype=torch.float32):
            if idx in by_layer:
                cap = capture_layer(layer, hidden, cos, sin, expert_calibration=c.expert_calibration,
                                    prob_weighted=c.prob_weighted)
                routed_only = c.expert_calibration == "routed" and cap.expert_tokens is not None
                fed = (cap.expert_tokens >= c.min_expert_tokens) if routed_only else None
                for e in by_layer[idx]:
                    rel = e.module[len(f"model.layers.{idx}") + 1:]
                    w = layer.get_parameter(rel).data
                    ldlq = torch.full((w.shape[0],), e.rule.method != "rtn")
                    if fed is not None:
                        ldlq &= fed
                    out[e.module] = _factor(w, cap.stat_for(rel).H, ldlq)
            if idx == max(by_layer):
                break
            with torch.no_grad():
                hidden = hidden.map(lambda h, layer=layer: layer(h, cos, sin))
    return out, True


def apply_budget(ckpt: Checkpoint, recipe: Recipe, options) -> tuple[Recipe, dict]:
    """The recipe with its bit budget resolved (module doc) and the report block (asked, planned, K per unit)."""
    B = recipe.bits_per_weight
    base = replace(recipe, bits_per_weight=None)
    if options.export != "quantkit":
        raise UsageError(f"--bits-per-weight picks the trellis code's bits, which the {options.export} export cannot hold")
    entries = [e for e in make_plan(ckpt.config, base).entries if e.rule.format == "trellis"]
    if not entries:
        raise UsageError(f"--bits-per-weight picks the trellis code's bits per routed-expert tensor, and recipe "
                         f"{recipe.name!r} puts no routed experts in the trellis code (use w2trellis or a recipe "
                         "file with format: trellis)")
    groups = _units(entries)
    size = {u: {k: sum(s.nbytes for e in es for s in trellis_fmt.module_specs(e.module, e.shape, k, ckpt.config.spec)) for k in BITS}
            for u, es in groups.items()}
    weights = {u: sum(e.shape[0] * e.shape[1] * e.shape[2] for e in es) for u, es in groups.items()}
    lo, hi = budget_bounds([Unit(u, weights[u], size[u], {}) for u in groups])
    if not lo <= B <= hi:
        raise UsageError(f"--bits-per-weight {B:g} is outside what the trellis code gives these routed experts: "
                         f"{lo:.3f} (all at 2 bits) to {hi:.3f} (all at 4 bits) bits/weight, every stored byte counted")
    t0 = time.perf_counter()
    factors, calibrated = _factors(ckpt, entries, options)
    units = [Unit(u, weights[u], size[u], {k: sum(code_mse(k, e.rule.state_bits) * factors[e.module] for e in es)
                                            for k in BITS}) for u, es in groups.items()]
    choice = allocate(units, B)
    rules = tuple((rf"^{re.escape(e.module)}$", replace(e.rule, bits=choice[u])) for u, es in groups.items() for e in es)
    resolved = replace(base, name=f"{recipe.name}@{B:g}bpw", rules=(*rules, *base.rules))
    planned = 8 * sum(size[u][choice[u]] for u in groups) / sum(weights.values())
    report = {
        "bits_per_weight": B, "planned_bits_per_weight": planned, "bounds": [lo, hi], "weights": sum(weights.values()),
        "sensitivity": ("predicted calibration proxy loss tr(dW H dW^T) at each K"
                        + ("" if calibrated else " with H = I (no calibration)")),
        "seconds": round(time.perf_counter() - t0, 2),
        "units": [{"unit": u.name, "bits": choice[u.name], "weights": u.weights,
                   "bits_per_weight": 8 * u.bytes[choice[u.name]] / u.weights,
                   "predicted_loss": {str(k): v for k, v in u.loss.items()}} for u in units],
    }
    return resolved, report


def format_budget(b: dict) -> list[str]:
    """Dry-run lines: the budget, what the plan reaches, and K per unit, one layer per line."""
    head = (f"  bit budget: {b['bits_per_weight']:g} bits/weight asked, {b['planned_bits_per_weight']:.3f} planned over "
            f"{b['weights']:,} trellis-coded routed-expert weights (range {b['bounds'][0]:.3f}..{b['bounds'][1]:.3f}); "
            f"sensitivity: {b['sensitivity']} ({b['seconds']:.1f} s)")
    lines = [head]
    layers: dict[str, list[str]] = {}
    for u in b["units"]:
        stem, _, leaf = u["unit"].rpartition(".")
        layers.setdefault(stem, []).append(f"{leaf.replace('_proj', '')} {u['bits']}")
    lines += [f"    {stem}: " + ", ".join(parts) + " bits" for stem, parts in layers.items()]
    return lines
