"""The backend switch (``auto`` | ``triton`` | ``torch``) and the two entry points quantized modules call.

``auto`` is Triton on a CUDA device (when triton is installed) and torch elsewhere. ``triton`` on a machine
without CUDA is allowed only under ``TRITON_INTERPRET=1`` (Triton's CPU interpreter: tests). Weights a kernel
cannot read (3-bit fields straddle int32 words; groups with no power-of-two divisor of at least 16) take the
torch path whatever the backend: ``tile_k`` is the one place that decides.
Modules opt in by declaring a class attribute ``backend = "torch"``; ``set_backend`` sets it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from quantkit.errors import UsageError

BACKENDS = ("auto", "torch", "triton")
POISON = False  # tests set it: every buffer the kernels allocate starts as NaN (-1 for ints)


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        t.fill_(float("nan") if dtype.is_floating_point else -1)
    return t


_COUNTERS: dict = {}


def split_counters(device, tiles: int) -> torch.Tensor:
    """Arrival counters for kernels whose programs split a reduction (dense split-K, the routing kernel's
    split over H): int32 zeros, and each launch leaves them at zero again (the program that arrives last
    resets its tile's counter). One buffer per device, made on first use and grown when a launch has more
    tiles; kernels on one stream run one after another, so they share it. A first call before CUDA-graph
    capture (the benchmarks' warm-up) keeps the allocation out of the graph."""
    device = torch.device(device)
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < tiles:
        buf = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on", "y")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(backend: str, device) -> str:
    """The backend to run with on ``device``: ``torch`` or ``triton``; a clear error where Triton cannot run."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: use one of {', '.join(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "torch" or (backend == "auto" and not (on_cuda and triton_available())):
        return "torch"
    if not triton_available():
        raise UsageError("backend 'triton' needs the triton package (Linux: pip install triton); use --backend torch")
    if not on_cuda and not interpreting():
        raise UsageError(f"backend 'triton' needs a CUDA device, not {device} (TRITON_INTERPRET=1 runs the kernels in "
                         "Triton's slow CPU interpreter, for tests); use --backend torch")
    return "triton"


def set_backend(model: torch.nn.Module, backend: str) -> int:
    """Set ``backend`` ('torch' or 'triton') on every module that has one. Returns how many."""
    count = 0
    for mod in model.modules():
        if hasattr(type(mod), "backend"):
            mod.backend = backend
            count += 1
    return count


def tile_k(w, cap: int = 128) -> int:
    """The kernels' K tile for weight ``w`` (``reference.IntWeight`` / ``Code2Weight``), or 0 when they cannot
    read it. A tile never straddles a scale group: the 2-bit code's 64-group; for int weights the largest
    power of two <= ``cap`` dividing the group (``cap`` for one group per row), at least 16 (``tl.dot``)."""
    from quantkit.kernels import reference

    if isinstance(w, reference.Code2Weight):
        return 64
    if isinstance(w, reference.TrellisWeight):
        from quantkit.kernels.trellis import BK

        return BK if w.k % BK == 0 else 0
    if w.bits not in reference.KERNEL_BITS:
        return 0
    if w.group_size == w.k:
        return cap
    bk = 1
    while bk * 2 <= cap and w.group_size % (bk * 2) == 0:
        bk *= 2
    return bk if bk >= 16 else 0


def kernel_reads(w) -> bool:
    """Whether the Triton kernels read this weight (else the torch twin runs)."""
    return tile_k(w) > 0


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (asked once per device); 8 stands in off-GPU (interpreter)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def linear(x: torch.Tensor, w, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """x @ W^T (+ bias) through the Triton kernel when ``backend`` is triton and it reads ``w``, else the twin."""
    from quantkit.kernels import reference

    if backend == "triton" and kernel_reads(w):
        if isinstance(w, reference.Code2Weight):
            from quantkit.kernels.code2 import code2_linear

            return code2_linear(x, w, bias)
        if isinstance(w, reference.TrellisWeight):
            from quantkit.kernels.trellis import trellis_linear

            return trellis_linear(x, w, bias)
        from quantkit.kernels.dense import int_linear

        return int_linear(x, w, bias)
    return reference.linear(x, w, bias)


def gate_up(x: torch.Tensor, gate, up, backend: str) -> torch.Tensor:
    """silu(x @ G^T) * (x @ U^T): one Triton launch when ``backend`` is triton and the kernel reads both weights
    as a pair (``dense.paired``); else two ``linear`` calls (each Triton or torch) and the SiLU product in torch."""
    if backend == "triton" and kernel_reads(gate) and kernel_reads(up):
        from quantkit.kernels.dense import gate_up as triton_gate_up

        out = triton_gate_up(x, gate, up)
        if out is not None:
            return out
    return torch.nn.functional.silu(linear(x, gate, None, backend)) * linear(x, up, None, backend)


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate, up, down,
              backend: str, add: torch.Tensor | None = None) -> torch.Tensor:
    """Routed experts for x [T, H] with stacked [E, ...] weights (``reference.IntWeight`` / ``Code2Weight``),
    plus ``add``: the fused Triton MoE, or the twin's loop."""
    from quantkit.kernels import reference

    if backend == "triton" and all(isinstance(w, reference.TrellisWeight) for w in (gate, up, down)):
        from quantkit.kernels.trellis import trellis_moe

        return trellis_moe(x, topk_ids, topk_weights, gate, up, down, add)
    if backend == "triton" and all(kernel_reads(w) and not isinstance(w, reference.TrellisWeight) for w in (gate, up, down)):
        from quantkit.kernels.fused_moe import fused_moe as triton_moe

        return triton_moe(x, topk_ids, topk_weights, gate, up, down, add=add)
    return reference.fused_moe(x, topk_ids, topk_weights, gate, up, down, add)


def route(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, spec, backend: str
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The one routing entry: x [T, H], gate_weight [E, H] fp32, bias (``spec.has_bias``) -> (topk_ids [T, k] int64,
    topk_weights [T, k] fp32) for ``spec`` (a ``routers.RouterSpec``): one Triton launch for every spec when
    ``backend`` is triton (``kernels/routing.py``), else ``routers.route``."""
    if backend == "triton":
        from quantkit.kernels.routing import route as triton_route

        return triton_route(x, gate_weight, bias, spec)
    from quantkit.model.routers import route as torch_route

    return torch_route(x, gate_weight, bias, spec)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str) -> torch.Tensor:
    """``layers.rms_norm``: one Triton launch when ``backend`` is triton, else the torch ops."""
    if backend == "triton":
        from quantkit.kernels.pointwise import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps)
    from quantkit.model.layers import rms_norm as torch_rms_norm

    return torch_rms_norm(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str, style: str = "interleaved") -> torch.Tensor:
    """``layers.apply_rope`` (x [B, heads, T, D], cos/sin [T, R], R <= D rotate, the rest pass): one Triton launch when
    ``backend`` is triton and the kernel takes the dims (``pointwise.rope_reads``), else the torch ops."""
    if backend == "triton":
        from quantkit.kernels import pointwise

        if pointwise.rope_reads(x.shape[-1], cos.shape[-1]):
            return pointwise.rope(x, cos, sin, style, cos.shape[-1])
    from quantkit.model.layers import apply_rope

    return apply_rope(x, cos, sin, style)
