"""Sweep the tile configs of the fused MoE and dense kernels at ERNIE-4.5-21B-A3B shapes and report, per
(layer, format, M), the default config's time next to the best candidate's: the data for retuning
``fused_moe.moe_config`` and ``dense.pick_config`` on a GPU.

    python benchmarks/tune.py [--m 1,16,256,2048] [--formats w4g128,w2code] [--json FILE]
    python benchmarks/tune.py --tiny     # CPU, Triton interpreter, tiny shapes: checks the script only

Times: median µs of one call (``do_bench``, L2 flushed, inputs rotated), each candidate compiled and warmed up
first; a candidate that fails to compile or launch (e.g. too much shared memory) is reported with its error.
The MoE candidates use one config for both launches (gate_up and down must share the token block).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_common as gc  # noqa: E402
from kernels import DENSE, MOE, TINY_DENSE, TINY_MOE  # noqa: E402


def moe_candidates(m: int, top_k: int, experts: int, bk: int) -> list:
    from quantkit.kernels.dense import Config

    if m * top_k / experts <= 16:
        return [Config(16, bn, bk, 1, w, st, False) for bn in (32, 64, 128) for w in (4, 8) for st in (3, 4, 5)
                if not (bn == 32 and w == 8)]
    return [Config(bm, bn, min(bk, 64), 1, w, st, sit) for bm in (32, 64, 128) for bn in (64, 128) for w in (4, 8)
            for st in (3, 4) for sit in (False, True) if not (bm == 128 and bn == 128)]


def dense_candidates(m: int, n: int, k: int, bk: int, sms: int) -> list:
    from dataclasses import replace

    from quantkit.kernels.dense import Config, pick_config

    base = pick_config(m, n, k, bk, sms)
    if m <= 16:
        k_tiles = -(-k // bk)
        return [Config(16, bn, bk, split, 4, st, False) for bn in (32, 64, 128) for st in (3, 4)
                for split in sorted({1, max(1, base.split_k // 2), base.split_k, min(k_tiles, 2 * base.split_k)})]
    return [replace(base, bm=bm, bn=bn, bk=min(bk, 64), num_warps=w, num_stages=st, scale_in_tile=sit)
            for bm in (64, 128) for bn in (64, 128) for w in (4, 8) for st in (3, 4) for sit in (False, True)
            if not (bm == 128 and bn == 128)]


def sweep(label: dict, default_cfg, candidates: list, run, device: str) -> dict:
    """Time ``run(cfg)`` for the default and every candidate; the row keeps the default, the best (the default
    included, so gain >= 1) and all."""
    def timed(cfg):
        try:
            run(cfg)  # compile + warm up
            return gc.timed_us([lambda: run(cfg)], device), None
        except Exception as e:  # noqa: BLE001 - a config the GPU cannot run is a result, not a crash
            return None, f"{type(e).__name__}: {str(e)[:120]}"

    tried = []
    for cfg in [default_cfg] + [c for c in candidates if c != default_cfg]:
        us, error = timed(cfg)
        tried.append({"config": vars(cfg), "us": us, "error": error})
    default_us, err = tried[0]["us"], tried[0]["error"]
    ok = [t for t in tried if t["us"] is not None]
    best = min(ok, key=lambda t: t["us"]) if ok else None
    return {**label, "default": vars(default_cfg), "default_us": default_us, "default_error": err,
            "best": best and best["config"], "best_us": best and best["us"],
            "gain": (default_us / best["us"]) if best and default_us else None, "tried": tried}


def short(cfg: dict | None) -> str:
    if not cfg:
        return ""
    text = f"bm{cfg['bm']} bn{cfg['bn']} bk{cfg['bk']} w{cfg['num_warps']}s{cfg['num_stages']}"
    return text + (f" split{cfg['split_k']}" if cfg["split_k"] > 1 else "") + (" sit" if cfg["scale_in_tile"] else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,256,2048", help="tokens per step, comma-separated")
    ap.add_argument("--formats", default="w4g128,w2code")
    ap.add_argument("--skip-dense", action="store_true")
    ap.add_argument("--json", default=None, help="output (default benchmarks/results/tune_<device>_<date>.json)")
    ap.add_argument("--tiny", action="store_true", help="CPU + Triton interpreter, tiny shapes (checks the script only)")
    args = ap.parse_args()
    device = gc.setup(args.tiny, "benchmarks/tune.py")
    import torch

    from quantkit.kernels import dispatch
    from quantkit.kernels.code2 import code2_linear
    from quantkit.kernels.dense import int_linear, pick_config
    from quantkit.kernels.fused_moe import fused_moe, moe_config

    torch.manual_seed(0)
    ms = [1, 33] if args.tiny else [int(v) for v in args.m.split(",")]
    dims, shapes = (TINY_MOE, TINY_DENSE) if args.tiny else (MOE, {"q_proj": DENSE["q_proj"], "shared down": DENSE["shared down"]})
    e, top_k, hdim, inter = dims["experts"], dims["top_k"], dims["hidden"], dims["inter"]
    make = {"w4g128": lambda lead, n, k: gc.int_weight(lead, n, k, device),
            "w2code": lambda lead, n, k: gc.code2_weight(lead, n, k, device)}
    sms = dispatch.sm_count(torch.device(device))
    rows = []
    with torch.no_grad():
        for fmt in args.formats.split(","):
            gate, up, down = make[fmt]((e,), inter, hdim), make[fmt]((e,), inter, hdim), make[fmt]((e,), hdim, inter)
            for m in ms:
                x = torch.randn(m, hdim, device=device).to(torch.bfloat16)
                ids = torch.rand(m, e, device=device).argsort(1)[:, :top_k]
                w = torch.full((m, top_k), 1 / top_k, device=device)
                bk = dispatch.tile_k(gate)
                default = moe_config(m, top_k, e, 2 * inter, bk)
                rows.append(sweep({"kind": "moe", "layer": f"E{e} top{top_k}", "format": fmt, "m": m}, default,
                                  moe_candidates(m, top_k, e, bk)[: 2 if args.tiny else None],
                                  lambda c: fused_moe(x, ids, w, gate, up, down, configs=(c, c)), device))
                print(f"moe {fmt} M={m}: {rows[-1]['default_us']} -> {rows[-1]['best_us']}", flush=True)
            if args.skip_dense:
                continue
            for name, (n, k) in shapes.items():
                wt = make[fmt]((), n, k)
                op = code2_linear if fmt == "w2code" else int_linear
                for m in ms:
                    x = torch.randn(m, k, device=device).to(torch.bfloat16)
                    bk = dispatch.tile_k(wt)
                    rows.append(sweep({"kind": "dense", "layer": name, "format": fmt, "m": m}, pick_config(m, n, k, bk, sms),
                                      dense_candidates(m, n, k, bk, sms)[: 2 if args.tiny else None],
                                      lambda c: op(x, wt, config=c), device))
    for r in rows:
        r["default_cfg"], r["best_cfg"] = short(r["default"]), short(r["best"])
    info = gc.device_info(device)
    print(gc.table(rows, [("kind", "kind", ""), ("layer", "layer", ""), ("format", "format", ""), ("m", "M", "d"),
                          ("default_cfg", "default", ""), ("default_us", "µs", ".1f"), ("best_cfg", "best", ""),
                          ("best_us", "µs", ".1f"), ("gain", "gain", ".2f")]))
    gc.save(args, "tune", info, {"info": info, "rows": rows})


if __name__ == "__main__":
    main()
