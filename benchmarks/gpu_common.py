"""Helpers shared by the GPU benchmarks (kernels.py, decode.py): device checks, timing, random packed weights.

Timing is ``triton.testing.do_bench`` (CUDA events, median, L2 flushed before each call) over a callable that
rotates among several input sets, so repeated calls do not find their inputs in L2 either. ``--tiny`` runs
the same code paths on CPU under Triton's interpreter with small shapes and wall-clock times that are NOT
measurements (for checking the scripts without a GPU).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

L2_BYTES = 50 * 2**20  # H100; read from the device when torch exposes it


def setup(tiny: bool, script: str) -> str:
    """'cuda', or 'cpu' under the interpreter for --tiny; one error line and exit 1 otherwise."""
    if torch.cuda.is_available() and not tiny:
        return "cuda"
    if tiny:
        os.environ["TRITON_INTERPRET"] = "1"
        return "cpu"
    print(f"error: {script} needs a CUDA device (use --tiny to check the script on CPU; its times are not measurements)",
          file=sys.stderr)
    sys.exit(1)


def commit() -> str | None:
    """The checkout's commit (with '+dirty' for uncommitted changes), for the results' provenance."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout (e.g. a copied tree)
    return head + ("+dirty" if dirty else "")


def device_info(device: str) -> dict:
    import triton

    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "commit": commit()}
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    l2_bytes=getattr(p, "L2_cache_size", None), cuda=torch.version.cuda)
    else:
        info.update(device="cpu (Triton interpreter; times are not measurements)")
    return info


def rotations(bytes_per_set: int, device: str, cap: int = 32) -> int:
    """Input sets to cycle through so that together they are 4x the L2 (at least 2)."""
    if device != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", L2_BYTES) or L2_BYTES
    return max(2, min(cap, math.ceil(4 * l2 / max(bytes_per_set, 1))))


def timed_us(fns: list, device: str) -> float:
    """Median µs of one call, cycling through ``fns`` (one callable per input set)."""
    i = [0]

    def step():
        fns[i[0] % len(fns)]()
        i[0] += 1

    if device == "cuda":
        import triton.testing

        return 1e3 * triton.testing.do_bench(step, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def graphed(fn, device: str):
    """A callable replaying a CUDA graph of ``fn`` (inputs fixed at capture), or ``fn`` itself off-GPU."""
    if device != "cuda":
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compile and warm up outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth(device: str) -> float | None:
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    if device != "cuda":
        return None
    a = torch.randn(2**28, device=device)  # 1 GiB of fp32
    b = torch.empty_like(a)
    us = timed_us([lambda: b.copy_(a)], device)
    return 2 * a.nbytes / (us * 1e-6)


# -- random packed weights (speed does not depend on the values; random data avoids zero shortcuts) --------

def int_weight(lead: tuple, n: int, k: int, device: str, bits: int = 4, group: int = 128, asym: bool = False):
    from quantkit.format.compressed_tensors import packed_words
    from quantkit.kernels.reference import IntWeight

    packed = torch.randint(-2**31, 2**31 - 1, (*lead, n, packed_words(k, bits)), dtype=torch.int32, device=device)
    scale = (0.01 * torch.rand(*lead, n, k // group, device=device) + 1e-3).to(torch.bfloat16)
    zero = None
    if asym:
        zero = torch.randint(-2**31, 2**31 - 1, (*lead, packed_words(n, bits), k // group), dtype=torch.int32, device=device)
    return IntWeight(packed, scale, zero, bits, group, n, k)


def code2_weight(lead: tuple, n: int, k: int, device: str):
    from quantkit.format.wint2 import scale_rows
    from quantkit.kernels.reference import Code2Weight

    qw = torch.randint(0, 256, (*lead, k // 4, n), dtype=torch.uint8, device=device)
    ws = torch.randint(0, 256, (*lead, scale_rows(k), n), dtype=torch.uint8, device=device)
    sup = (0.002 * torch.rand(*lead, n, device=device) + 5e-4).to(torch.bfloat16)
    cs = torch.randint(1, 64 * 256, (*lead, n), device=device).float() / 256
    zp = torch.randint(0, 64 * 256, (*lead, n), device=device).float() / 256
    return Code2Weight(qw, ws, sup, cs, zp)


def trellis_weight(lead: tuple, n: int, k: int, device: str, bits: int = 2, L: int = 16):
    """Random trellis words (any stream is a valid code) and fp16 suh/svh of the encoder's magnitudes."""
    from quantkit.kernels.reference import TrellisWeight

    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (*lead, n // 16, k // 16, 8 * bits), dtype=torch.int32, device=device)
    suh = (0.08 * torch.randn(*lead, k, device=device)).half()
    svh = (2e-3 * torch.randn(*lead, n, device=device)).half()
    return TrellisWeight(words, suh, svh, bits, L)


def grouped_moe_bf16(x, ids, weights, experts):
    """The bf16 MoE in torch without a host sync (so a CUDA graph can hold it): (token, expert) pairs sorted by
    expert, one ``torch._grouped_mm`` per projection over all E experts' weights (experts without pairs are
    skipped by the grouped GEMM), weighted and summed back per token."""
    import torch.nn.functional as F

    k, e = ids.shape[1], experts.num_experts
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(e, dtype=torch.int32, device=x.device).scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = counts.cumsum(0, dtype=torch.int32)
    tok = order // k
    xs = x[tok]
    gate = torch._grouped_mm(xs, experts.gate_proj.transpose(-2, -1), offs=offs)
    up = torch._grouped_mm(xs, experts.up_proj.transpose(-2, -1), offs=offs)
    y = torch._grouped_mm(F.silu(gate) * up, experts.down_proj.transpose(-2, -1), offs=offs)
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)


def grouped_moe_bf16_module(experts, x, topk_ids, topk_weights, add=None):
    """``Experts.forward`` replacement (bind with types.MethodType) computing ``grouped_moe_bf16``."""
    out = grouped_moe_bf16(x, topk_ids, topk_weights, experts)
    return out if add is None else out + add


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out - ref‖ / ‖ref‖ in fp64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def weight_bytes(w) -> int:
    """Bytes a kernel reads for a weight (all its tensors), or a dense tensor's."""
    if isinstance(w, torch.Tensor):
        return w.nbytes
    return sum(t.nbytes for t in vars(w).values() if isinstance(t, torch.Tensor))


def write_json(path: str | None, default_name: str, payload: dict) -> Path:
    out = Path(path) if path else Path(__file__).parent / "results" / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return out


def save(args, kind: str, info: dict, payload: dict) -> None:
    """Write ``payload`` to --json or to results/KIND_DEVICE_DATE.json; a --tiny run writes only with --json."""
    if args.tiny and not args.json:
        print("(--tiny: nothing written)")
        return
    name = f"{kind}_{info['device'].replace(' ', '_')}_{info['date'][:10]}.json"
    print(f"wrote {write_json(args.json, name, payload)}")


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Fixed-width text table; cols = (key, header, format)."""
    head = [h for _, h, _ in cols]
    body = [[("" if r.get(k) is None else format(r[k], f)) for k, _, f in cols] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.rjust(w) for x, w in zip(line, widths)) for line in [head] + body]
    return "\n".join(lines)
