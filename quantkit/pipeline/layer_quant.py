"""Quantize one materialised decoder layer per its plan entries, with or without calibration statistics.

``quantize_layer`` returns the QTensors to write, leaves the layer holding the *dequantized* weights
(so the next layer is calibrated on what the quantized model really computes, GPTQ's sequential mode),
and measures each module's relative output error on the calibration inputs from the Hessian alone:
    err = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ),   ΔW = dequant(Q) - W
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field

import torch

from quantkit.calib.capture import LayerCapture
from quantkit.quant.code2 import code2
from quantkit.quant.config import PlanEntry
from quantkit.quant.gptq import fp_target, gptq
from quantkit.quant.qtensor import Code2Tensor, QTensor, TrellisTensor
from quantkit.quant.rtn import rtn
from quantkit.quant.trellis import trellis

EXPERT_CHUNK = 8  # experts per batched GPTQ call (bounds the [chunk, K, K] working set)
TRELLIS_CHUNK_BYTES = 1 << 30  # the trellis encoder's: its three fp32 [chunk, K, K] (H, rotated H, Cholesky factor)


@dataclass
class LayerResult:
    qtensors: dict[str, QTensor | Code2Tensor | TrellisTensor] = field(default_factory=dict)  # by module name relative to the layer
    errors: dict[str, float | list[float]] = field(default_factory=dict)
    rtn_fallback_experts: list[int] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # encode time per module (without the error measurement)


def relative_error(w: torch.Tensor, deq: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) over the last two dims (batched over experts)."""
    D = deq.float() - w.float()
    num = ((D @ H) * D).sum((-2, -1))
    den = ((w.float() @ H) * w.float()).sum((-2, -1)).clamp_min(1e-30)
    return num / den


def _cat(parts: list) -> QTensor | Code2Tensor:
    if isinstance(parts[0], Code2Tensor):
        return Code2Tensor(*(torch.cat(ts) for ts in zip(*(p.tensors().values() for p in parts))))
    if isinstance(parts[0], TrellisTensor):
        return TrellisTensor(*(torch.cat(ts) for ts in zip(*(p.tensors().values() for p in parts))), parts[0].bits, parts[0].L)
    return QTensor(torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                   None if parts[0].zeros is None else torch.cat([p.zeros for p in parts]), parts[0].bits, parts[0].group_size)


def _quantize(entry: PlanEntry, w: torch.Tensor, H: torch.Tensor | None, scale_dtype, use_gptq: bool) -> QTensor | Code2Tensor:
    """RTN, GPTQ or the 2-bit code of one module; 3-D experts in chunks so the fp32 working set stays small."""
    r = entry.rule
    if r.format == "code2":
        parts = [code2(w[i:i + EXPERT_CHUNK], H[i:i + EXPERT_CHUNK] if use_gptq and H is not None else None)
                 for i in range(0, w.shape[0], EXPERT_CHUNK)]
        return _cat(parts)
    if r.format == "trellis":  # more experts per call: LDLQ's strips batch their tiles over experts
        c = max(EXPERT_CHUNK, TRELLIS_CHUNK_BYTES // (12 * w.shape[-1] ** 2))
        parts = [trellis(w[i:i + c], H[i:i + c] if use_gptq and H is not None else None,
                         bits=r.bits, L=r.state_bits, seed=r.seed) for i in range(0, w.shape[0], c)]
        return _cat(parts)

    def one(wc, Hc):
        if use_gptq and Hc is not None:
            return gptq(wc, Hc, r.bits, entry.group_size, r.symmetric, act_order=r.act_order, clip_search=r.use_clip,
                        scale_dtype=scale_dtype, damp=r.damp)
        cw = None if Hc is None else torch.diagonal(Hc, dim1=-2, dim2=-1)[..., None, :]  # clip by output energy
        return rtn(wc, r.bits, entry.group_size, r.symmetric, clip_search=r.use_clip, scale_dtype=scale_dtype,
                   clip_weight=cw)

    if w.dim() == 2:
        return one(w, H)
    return _cat([one(w[i:i + EXPERT_CHUNK], None if H is None else H[i:i + EXPERT_CHUNK]) for i in range(0, w.shape[0], EXPERT_CHUNK)])


def quantize_layer(layer, prefix: str, entries: list[PlanEntry], cap: LayerCapture | None, *,
                   scale_dtype: torch.dtype, min_expert_tokens: int = 0, expert_calibration: str = "routed") -> LayerResult:
    """Quantize ``layer``'s planned modules (``entries`` carry full names starting with ``prefix``)."""
    res = LayerResult()
    starving: list[int] = []
    if cap is not None and cap.expert_tokens is not None and expert_calibration == "routed":
        starving = [e for e, n in enumerate(cap.expert_tokens.tolist()) if n < min_expert_tokens]
        if starving:
            warnings.warn(f"{prefix}: experts {starving} saw fewer than {min_expert_tokens} calibration tokens; "
                          "they are quantized without their Hessian (RTN, or the plain 2-bit-code encoder)", stacklevel=2)
        res.rtn_fallback_experts = starving
    for entry in entries:
        rel = entry.module[len(prefix) + 1:]
        param = layer.get_parameter(rel if entry.is_experts else f"{rel}.weight")
        w = param.data  # updated in place with the dequantized weights below
        use_gptq = cap is not None and "gptq" in entry.rule.method
        st = cap.stat_for(rel) if cap is not None else None
        H = None if st is None else st.H
        target = w
        if use_gptq and entry.rule.fp_target and st.M is not None and entry.rule.format == "int":
            target = fp_target(w, H, st.M, damp=entry.rule.damp)  # GPTQ then minimises Σ‖W x_fp − Q x̃‖²
        t0 = time.perf_counter()
        qt = _quantize(entry, target, H, scale_dtype, use_gptq)
        if entry.is_experts and starving and use_gptq and isinstance(qt, (Code2Tensor, TrellisTensor)):  # plain encoder
            fallback = code2(w[starving]) if isinstance(qt, Code2Tensor) else trellis(w[starving], bits=qt.bits, L=qt.L)
            for t, f in zip(qt.tensors().values(), fallback.tensors().values()):
                t[starving] = f
        elif entry.is_experts and starving and use_gptq:  # too few tokens for a trustworthy Hessian
            fallback = rtn(w[starving], entry.rule.bits, entry.group_size, entry.rule.symmetric,
                           clip_search=entry.rule.use_clip, scale_dtype=scale_dtype)
            qt.codes[starving], qt.scales[starving] = fallback.codes, fallback.scales
            if qt.zeros is not None:
                qt.zeros[starving] = fallback.zeros
        res.seconds[rel] = round(time.perf_counter() - t0, 3)
        if cap is not None:  # measure, and leave the quantized weights in the layer for the next one
            errs = []
            for i in range(0, w.shape[0], EXPERT_CHUNK) if entry.is_experts else [None]:
                sl = slice(None) if i is None else slice(i, i + EXPERT_CHUNK)
                deq = qt.select(sl).dequantize(torch.float32)
                errs.append(relative_error(w[sl], deq, H[sl]).reshape(-1))
                w[sl] = deq.to(w.dtype)
            err = torch.cat(errs)
            res.errors[rel] = err.tolist() if entry.is_experts else float(err[0])
        res.qtensors[rel] = qt
    return res
