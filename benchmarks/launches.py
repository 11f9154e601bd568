"""Kernel launches per decode step, counted on a CPU: what a CUDA graph of one step would hold, per part of a
layer (attention, dense MLP, MoE block), for bf16, W4 g128 and W2-code at ERNIE-4.5-21B-A3B's dimensions.

    python benchmarks/launches.py [--layers 2] [--batch 1] [--json FILE]

Why: at batch 1 a W4 MoE layer reads ~50 MB of weights, ~17 µs at an H100's copy bandwidth, and every extra
launch in a step costs a few µs even inside a CUDA graph; so the launches per layer bound what the M = 1
speed targets can reach. They do not depend on the weights' values, and they can be counted without a GPU.

How: the model (``decode.build``, random weights, the real dimensions, ``--layers`` decoder layers: layer 0 has
the dense MLP, the others the MoE) runs one decode step on the CPU. Each Triton launch is counted and not
run (its outputs stay unwritten: values are meaningless here, launches are not); each torch operator that
reaches the ATen dispatcher is counted unless it is a view or an allocation without a fill, which launch
nothing. ``_local_scalar_dense`` (``.item()``, ``.tolist()``, a tensor in an ``if``) is counted apart as a
host sync: a step with one cannot be captured in a CUDA graph. A CUDA device may run a few torch operators
as more than one kernel (e.g. ``topk``), so the torch counts are a floor; the Triton counts are exact.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_common as gc  # noqa: E402

NO_KERNEL = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh", "alias", "_reshape_alias", "sym_size",
             "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "resolve_conj", "resolve_neg",
             "promote_types", "result_type"}
HOST_SYNC = {"_local_scalar_dense", "nonzero", "equal"}


class Counter:
    """Counts launches into ``self.part``'s tally (the innermost module being timed, or 'other')."""

    def __init__(self):
        self.tally: dict = collections.defaultdict(collections.Counter)
        self.parts: list[str] = ["other"]
        self.paused = False

    def add(self, kind: str, name: str) -> None:
        if self.paused:
            return
        self.tally[self.parts[-1]][kind] += 1
        self.tally[self.parts[-1]][f"{kind}:{name}"] += 1


def count_torch(counter: Counter):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in HOST_SYNC:
                counter.add("host_sync", name)
            elif not func.is_view and name not in NO_KERNEL:
                counter.add("torch", name)
            return func(*args, **(kwargs or {}))

    return Mode()


class CountOnly:
    """Stands in for a Triton kernel at its launch site: ``kernel[grid](*args)`` is counted, not run."""

    def __init__(self, kernel, counter: Counter):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.counter.add("triton", self.kernel.fn.__name__)
            if self.kernel.fn.__name__ == "_route_kernel":  # valid expert ids (0) for what reads them next
                self.counter.paused = True
                args[3].zero_()
                self.counter.paused = False
        return launch


def triton_kernels() -> list[tuple]:
    """(module, attribute) of every Triton kernel quantkit launches (those this checkout has: the script also
    counts older commits, for before/after figures)."""
    import importlib

    names = [("dense", "_linear_kernel"), ("fused_moe", "_moe_kernel"), ("fused_moe", "_combine_kernel"),
             ("fused_moe", "_align_kernel"), ("routing", "_route_kernel"), ("pointwise", "_rms_norm_kernel"),
             ("pointwise", "_rope_kernel")]
    found = []
    for mod_name, attr in names:
        try:
            mod = importlib.import_module(f"quantkit.kernels.{mod_name}")
        except ImportError:
            continue
        if hasattr(mod, attr):
            found.append((mod, attr))
    return found


def step_counts(model, batch: int, counter: Counter) -> dict:
    import torch

    from quantkit.model.layers import KVCache

    parts = {"attention": "self_attn", "mlp": "mlp"}

    def enter(name):
        return lambda mod, args: counter.parts.append(name)

    def leave(mod, args, out):
        counter.parts.pop()

    hooks = []
    for layer_idx, layer in enumerate(model.model.layers):
        for part, attr in parts.items():
            mod = getattr(layer, attr)
            label = part if part == "attention" else ("moe" if hasattr(mod, "experts") else "dense_mlp")
            hooks += [mod.register_forward_pre_hook(enter(label)), mod.register_forward_hook(leave)]
    cache = KVCache(model.config.num_hidden_layers)
    ids = torch.zeros(batch, 4, dtype=torch.long)
    model(ids, cache)  # prefill, not counted
    counter.tally.clear()
    with count_torch(counter):
        model(ids[:, :1], cache)
    for h in hooks:
        h.remove()
    return {part: dict(c) for part, c in counter.tally.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (layer 0 dense, the rest MoE)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--schemes", default="bf16,w4g128,w2code")
    ap.add_argument("--json", default=None, help="output (default benchmarks/results/launches_<date>.json)")
    args = ap.parse_args()
    import torch

    from decode import build
    from quantkit.kernels import dispatch
    from quantkit.model.config import ErnieMoeConfig
    from quantkit.sources.random_models import ERNIE_21B_A3B, hf_config

    cfg = ErnieMoeConfig.from_dict(hf_config(dict(ERNIE_21B_A3B, num_hidden_layers=args.layers), "bfloat16"))
    counter = Counter()
    for mod, attr in triton_kernels():
        setattr(mod, attr, CountOnly(getattr(mod, attr), counter))
    dispatch.sm_count = lambda device: 132  # H100's SMs: the split-K choices of a GPU run
    dispatch.POISON = False
    rows = []
    torch.manual_seed(0)
    with torch.no_grad():
        for scheme in args.schemes.split(","):
            model = build(cfg, scheme, "cpu")
            counts = step_counts(model, args.batch, counter)
            moe_layers = args.layers - cfg.moe_layer_start_index
            for part, c in sorted(counts.items()):
                per = {"attention": args.layers, "moe": moe_layers, "dense_mlp": cfg.moe_layer_start_index}.get(part, 1)
                rows.append({"scheme": scheme, "part": part, "per_step_of": per,
                             "torch": c.get("torch", 0) / per, "triton": c.get("triton", 0) / per,
                             "launches": (c.get("torch", 0) + c.get("triton", 0)) / per,
                             "host_syncs": c.get("host_sync", 0) / per,
                             "ops": {k: v / per for k, v in sorted(c.items()) if ":" in k}})
            del model
    print(f"launches per decode step, batch {args.batch}, ERNIE-21B-A3B dims ({args.layers} layers; counts per "
          "layer for attention / dense_mlp / moe, per step for other)")
    print(gc.table(rows, [("scheme", "scheme", ""), ("part", "part", ""), ("launches", "launches", ".0f"),
                          ("torch", "torch ops", ".0f"), ("triton", "triton", ".0f"),
                          ("host_syncs", "host syncs", ".0f")]))
    for r in rows:
        if r["part"] == "moe":
            print(f"{r['scheme']} moe: " + ", ".join(f"{k} {v:g}" for k, v in r["ops"].items()))
    info = {"date": datetime.date.today().isoformat(), "counted_on": "cpu (launches counted, nothing timed)",
            "torch": torch.__version__, "commit": gc.commit()}
    out = gc.write_json(args.json, f"launches_b{args.batch}_{info['date']}.json",
                        {"info": info, "batch": args.batch, "layers": args.layers, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
