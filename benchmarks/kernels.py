"""Kernel benchmarks on ERNIE-4.5-21B-A3B shapes: dense projections and a whole MoE layer, bf16 vs W4 g128 vs
the 2-bit code, at tokens per step M in {1, 4, 16, 64, 256, 2048}.

    python benchmarks/kernels.py [--m 1,4,16,64,256,2048] [--json FILE] [--anchors] [--skip-dense|--skip-moe]
    python benchmarks/kernels.py --tiny     # CPU, Triton interpreter, tiny shapes: checks the script only

Dense rows: q/k/v/o projections and the shared experts' gate/up and down, ``F.linear`` with bf16 weights vs the
Triton W4 g128 (symmetric) and 2-bit-code kernels. MoE rows: router + 64 experts top-6 (random router weights:
random routing) + shared experts; bf16 = quantkit's torch path (a loop over the experts that got tokens; it
syncs on their counts, so it cannot be graph-captured); bf16-grouped = the same layer with one
``torch._grouped_mm`` per projection, no host sync and quantkit's routing kernel, eager and replayed from a CUDA
graph (the strongest bf16 baseline torch offers: "x grouped" is the speedup over its graph); W4 / W2-code = the
layer as quantkit runs it with backend triton (the routing kernel, the fused Triton MoE with the shared experts'
W4 output, gate and up in one launch, added in its combine), eager and replayed from a CUDA graph. Times: median µs (``do_bench``, L2 flushed,
inputs rotated); GB/s counts every byte a call must read (weights with scales, the experts actually routed
to, activations) plus its output; % of the measured device-to-device copy bandwidth. Random codes and
scales: the speed of these kernels does not depend on the values.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_common as gc  # noqa: E402

DENSE = {"q_proj": (2560, 2560), "k_proj/v_proj": (512, 2560), "o_proj": (2560, 2560),
         "shared gate/up": (3072, 2560), "shared down": (2560, 3072)}
MOE = dict(experts=64, top_k=6, hidden=2560, inter=1536, shared=3072)
TINY_DENSE = {"q_proj": (80, 128), "shared down": (64, 256)}  # N off the 64-wide tiles; the trellis code needs multiples of 16
TINY_MOE = dict(experts=8, top_k=2, hidden=128, inter=128, shared=128)


def dense_rows(device: str, ms: list[int], shapes: dict, anchors: bool) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from quantkit.kernels.code2 import code2_linear
    from quantkit.kernels.dense import int_linear
    from quantkit.kernels.trellis import trellis_linear

    rows = []
    for name, (n, k) in shapes.items():
        for m in ms:
            act = 2 * m * (n + k)
            methods = {
                "bf16": (lambda: (0.02 * torch.randn(n, k, device=device)).to(torch.bfloat16), F.linear),
                "w4g128": (lambda: gc.int_weight((), n, k, device), int_linear),
                "w2code": (lambda: gc.code2_weight((), n, k, device), code2_linear),
                "w2trellis": (lambda: gc.trellis_weight((), n, k, device), trellis_linear),
            }
            if anchors:
                methods.update(anchor_methods(n, k, device))
            times = {}
            for method, (make, op) in methods.items():
                try:
                    w0 = make()
                except Exception as e:  # an anchor that is not installed or does not run here
                    rows.append({"kind": "dense", "shape": name, "n": n, "k": k, "m": m, "method": method, "error": str(e)[:200]})
                    continue
                wbytes = gc.weight_bytes(w0)
                sets = [(torch.randn(m, k, device=device).to(torch.bfloat16), w0 if r == 0 else make())
                        for r in range(gc.rotations(wbytes + act, device))]
                us = gc.timed_us([lambda x=x, w=w: op(x, w) for x, w in sets], device)
                times[method] = us
                rows.append({"kind": "dense", "shape": name, "n": n, "k": k, "m": m, "method": method, "us": us,
                             "bytes": wbytes + act, "GBps": (wbytes + act) / us / 1e3})
            for r in rows[-len(methods):]:
                if "us" in r and "bf16" in times:
                    r["speedup_vs_bf16"] = times["bf16"] / r["us"]
    return rows


def anchor_methods(n: int, k: int, device: str) -> dict:
    """GemLite and torchao int4 (g128) as side-by-side anchors, where they are installed."""
    import torch

    def linear():
        lin = torch.nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
        torch.nn.init.normal_(lin.weight, std=0.02)
        return lin

    def torchao_int4():
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        # tile_packed_to_4d = torch's own tinygemm kernel (_weight_int4pack_mm); the default "plain" packing
        # needs fbgemm-gpu-genai, which the GPU machine does not have.
        lin = linear()
        quantize_(lin, Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
        return lin

    def gemlite_w4():
        from gemlite.helper import A16W4

        return A16W4(device=device).from_linear(linear())

    return {"torchao-int4": (torchao_int4, lambda x, mod: mod(x)), "gemlite-w4": (gemlite_w4, lambda x, mod: mod(x))}


def moe_rows(device: str, ms: list[int], dims: dict) -> list[dict]:
    import torch

    from quantkit.kernels.dense import gate_up, int_linear
    from quantkit.kernels.dispatch import fused_moe
    from quantkit.kernels.routing import route as triton_route
    from quantkit.model.layers import MLP, Experts, route
    from quantkit.model.routers import RouterSpec

    e, top_k, hdim, inter, shared = dims["experts"], dims["top_k"], dims["hidden"], dims["inter"], dims["shared"]
    bf = torch.bfloat16
    router = torch.randn(e, hdim, device=device) * 0.5 / hdim**0.5
    bias = torch.zeros(1, e, device=device)
    spec = RouterSpec(top_k=top_k, num_experts=e, has_bias=True, norm_min=1e-12)  # ERNIE's router
    experts = Experts(e, hdim, inter).to(device, bf)
    mlp = MLP(hdim, shared).to(device, bf)
    with torch.no_grad():
        for p in list(experts.parameters()) + list(mlp.parameters()):
            p.normal_(0, 0.02)
    s4 = [gc.int_weight((), shared, hdim, device), gc.int_weight((), shared, hdim, device),
          gc.int_weight((), hdim, shared, device)]
    quant = {"w4g128": [gc.int_weight((e,), inter, hdim, device), gc.int_weight((e,), inter, hdim, device),
                        gc.int_weight((e,), hdim, inter, device)],
             "w2code": [gc.code2_weight((e,), inter, hdim, device), gc.code2_weight((e,), inter, hdim, device),
                        gc.code2_weight((e,), hdim, inter, device)],
             "w2trellis": [gc.trellis_weight((e,), inter, hdim, device), gc.trellis_weight((e,), inter, hdim, device),
                           gc.trellis_weight((e,), hdim, inter, device)]}

    def shared_q(x):  # as MLP runs with backend triton: gate and up in one launch, then down
        return int_linear(gate_up(x, s4[0], s4[1]), s4[2])

    def layer_bf16(x):
        ids, w = route(x, router, bias, top_k, 1e-12)
        return experts(x, ids, w) + mlp(x)

    def layer_grouped(x):  # the routing kernel as in layer_q: the two differ only in the experts' weights
        ids, w = triton_route(x, router, bias, spec)
        return gc.grouped_moe_bf16(x, ids, w, experts) + mlp(x)

    def layer_q(x, ws):  # as SparseMoeBlock runs with backend triton: routing kernel, shared output into the combine
        ids, w = triton_route(x, router, bias, spec)
        return fused_moe(x, ids, w, *ws, "triton", add=shared_q(x))

    check = torch.randn(3, hdim, device=device).to(bf)  # the grouped baseline computes the same layer as the loop
    if (err := gc.rel_err(layer_grouped(check), layer_bf16(check))) > 2e-2:
        raise SystemExit(f"error: the grouped bf16 MoE differs from the loop (relative error {err:.3g})")

    bf16_expert, bf16_fixed = 3 * hdim * inter * 2, router.nbytes + sum(p.nbytes for p in mlp.parameters())
    per_expert = {"bf16": bf16_expert, "bf16-grouped": bf16_expert,
                  **{k: sum(gc.weight_bytes(w) for w in ws) // e for k, ws in quant.items()}}
    fixed = {"bf16": bf16_fixed, "bf16-grouped": bf16_fixed,
             **{k: router.nbytes + sum(gc.weight_bytes(w) for w in s4) for k in quant}}
    rows = []
    for m in ms:
        xs = [torch.randn(m, hdim, device=device).to(bf) for _ in range(8 if device == "cuda" else 2)]
        distinct = sum(route(x, router, bias, top_k, 1e-12)[0].unique().numel() for x in xs) / len(xs)
        act = 2 * m * hdim * 2
        variants = [("bf16", "eager", [lambda x=x: layer_bf16(x) for x in xs]),
                    ("bf16-grouped", "eager", [lambda x=x: layer_grouped(x) for x in xs]),
                    ("bf16-grouped", "graph", [gc.graphed(lambda x=x: layer_grouped(x), device) for x in xs])]
        for name, ws in quant.items():
            variants.append((name, "eager", [lambda x=x, ws=ws: layer_q(x, ws) for x in xs]))
            variants.append((name, "graph", [gc.graphed(lambda x=x, ws=ws: layer_q(x, ws), device) for x in xs]))
        batch = []
        for method, mode, fns in variants:
            us = gc.timed_us(fns, device)
            nbytes = fixed[method] + distinct * per_expert[method] + act
            batch.append({"kind": "moe", "shape": f"E{e} top{top_k} H{hdim} I{inter}", "m": m, "method": method,
                          "mode": mode, "us": us, "distinct_experts": distinct, "bytes": nbytes, "GBps": nbytes / us / 1e3})
        times = {(r["method"], r["mode"]): r["us"] for r in batch}
        for r in batch:
            r["speedup_vs_bf16"] = times["bf16", "eager"] / r["us"]
            r["speedup_vs_grouped"] = times["bf16-grouped", "graph"] / r["us"]
        rows += batch
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,4,16,64,256,2048", help="tokens per step, comma-separated")
    ap.add_argument("--json", default=None, help="output (default benchmarks/results/kernels_<device>_<date>.json)")
    ap.add_argument("--anchors", action="store_true", help="also time torchao int4 and GemLite W4 where installed")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--skip-moe", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU + Triton interpreter, tiny shapes (checks the script only)")
    args = ap.parse_args()
    device = gc.setup(args.tiny, "benchmarks/kernels.py")
    import torch

    torch.manual_seed(0)
    ms = [int(v) for v in args.m.split(",")] if not args.tiny else [1, 3, 33]
    info = gc.device_info(device)
    bw = gc.copy_bandwidth(device)
    info["copy_GBps"] = None if bw is None else bw / 1e9
    rows = []
    with torch.no_grad():
        if not args.skip_dense:
            rows += dense_rows(device, ms, TINY_DENSE if args.tiny else DENSE, args.anchors)
        if not args.skip_moe:
            rows += moe_rows(device, ms, TINY_MOE if args.tiny else MOE)
    for r in rows:
        if bw and "GBps" in r:
            r["pct_copy"] = 100 * r["GBps"] * 1e9 / bw
    cols = [("shape", "shape", ""), ("m", "M", "d"), ("method", "method", ""), ("mode", "mode", ""), ("us", "µs", ".1f"),
            ("GBps", "GB/s", ".0f"), ("pct_copy", "%copy", ".0f"), ("speedup_vs_bf16", "x bf16", ".2f"),
            ("speedup_vs_grouped", "x grouped", ".2f"), ("error", "error", "")]
    print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}  copy {info['copy_GBps'] or 0:.0f} GB/s")
    print(gc.table(rows, cols))
    gc.save(args, "kernels", info, {"info": info, "rows": rows})


if __name__ == "__main__":
    main()
