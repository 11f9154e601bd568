"""Peak RSS of walking a checkpoint one decoder layer at a time (the quantizer's access pattern).

    python benchmarks/load_memory.py [--src 'random:ernie-21b-a3b?layers=2'] [--tokens 16] [--json out.json]

The model is built first (cached) in a separate process, so the measured process only opens the
checkpoint, materialises the embeddings, then each layer in turn, runs it on a few tokens, and
releases it. Peak RSS comes from getrusage in that child process; the budget is
1.5 x (largest layer's weights) + embeddings, as the foundation issue asks.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def walk(src: str, tokens: int) -> dict:
    import psutil
    import torch

    from quantkit.model import Checkpoint, stream_layers
    from quantkit.sources import resolve

    torch.set_num_threads(2)
    base_rss = psutil.Process().memory_info().rss
    ckpt = Checkpoint(resolve(src))
    sk = ckpt.skeleton
    ckpt.materialize(sk.model.embed_tokens, "model.embed_tokens", "cpu", torch.bfloat16)
    emb_bytes = sk.model.embed_tokens.weight.nbytes
    ids = torch.randint(0, ckpt.config.vocab_size, (1, tokens))
    h = sk.model.embed_tokens(ids)
    cos, sin = sk.rope(0, tokens, "cpu")
    layers, t0 = [], time.perf_counter()
    for idx, layer in stream_layers(ckpt, dtype=torch.bfloat16):
        nbytes = sum(p.nbytes for p in layer.parameters())
        with torch.no_grad():
            h = layer(h, cos, sin)
        layers.append({"layer": idx, "moe": layer.is_moe, "weight_bytes": nbytes,
                       "rss_after": psutil.Process().memory_info().rss})
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    largest = max(x["weight_bytes"] for x in layers)
    budget = 1.5 * largest + emb_bytes
    return {
        "src": src, "tokens": tokens, "layers": layers, "seconds": seconds,
        "baseline_rss_bytes": base_rss, "peak_rss_bytes": peak, "embedding_bytes": emb_bytes,
        "largest_layer_bytes": largest, "budget_bytes": budget, "within_budget": peak < budget,
        "peak_over_baseline_bytes": peak - base_rss,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="random:ernie-21b-a3b?layers=2")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(walk(a.src, a.tokens)))
        return
    subprocess.run([sys.executable, "-c", f"from quantkit.sources import resolve; resolve({a.src!r})"], check=True)
    out = subprocess.run([sys.executable, __file__, "--child", "--src", a.src, "--tokens", str(a.tokens)],
                         check=True, capture_output=True, text=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    gb = 1 / 1e9
    print("| source | largest layer | embeddings | budget (1.5 x layer + emb) | peak RSS | peak - baseline | walk time |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {r['src']} | {r['largest_layer_bytes'] * gb:.2f} GB | {r['embedding_bytes'] * gb:.2f} GB | "
          f"{r['budget_bytes'] * gb:.2f} GB | {r['peak_rss_bytes'] * gb:.2f} GB | {r['peak_over_baseline_bytes'] * gb:.2f} GB | "
          f"{r['seconds']:.1f} s |")
    print("within budget" if r["within_budget"] else "OVER BUDGET")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
