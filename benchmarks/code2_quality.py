"""Quality and speed of the 2-bit convolutional code (CCQ / FastDeploy WINT2) against int2 g64.

    python benchmarks/code2_quality.py [--gaussian-n 1536] [--gaussian-k 2560] [--seed 0] [--json FILE]

An i.i.d. unit-Gaussian [N, K] matrix: per-weight MSE and bits per weight (every stored byte counted:
codes, 4-bit local scales, bf16 super scales, fp32 code scale/zero point) of the 2-bit code, of int2
g64 asymmetric RTN with the MSE clipping search (bf16 scales), and the rate-distortion bound at 2 bits
(2^-4 = 0.0625); encode throughput (weights/s) on this machine. A reference row: the best unstructured
256-point 4-D codebook we can train (Lloyd / k-means on 100k Gaussian 4-tuples, tested on fresh ones,
unquantized scale): what any one-byte-per-4-weights code with a fixed codebook can reach at best.
The demo model's perplexity under the code vs int2 g64 (at equal non-expert rules) is a row set of
``benchmarks/quality_table.py`` (its docstring gives the command).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from quantkit.format import compressed_tensors as ct_fmt
from quantkit.format import wint2
from quantkit.quant.code2 import POOL, code2, codebook_pool
from quantkit.quant.rtn import rtn

RD_BOUND_2BIT = 2.0 ** -4


def _bits(specs, weights: int) -> float:
    return 8 * sum(s.nbytes for s in specs) / weights


def lloyd_reference(seed: int, train: int = 100_000, iters: int = 40) -> float:
    """Per-weight MSE on fresh unit-Gaussian 4-tuples of a k-means (Lloyd) codebook of 256 4-D points."""
    gen = torch.Generator().manual_seed(seed + 1)
    x, test = torch.randn(train, 4, generator=gen), torch.randn(train, 4, generator=gen)
    c = x[torch.randperm(train, generator=gen)[:256]].clone()
    for _ in range(iters):
        a = (c.pow(2).sum(1) - 2 * x @ c.T).argmin(1)
        c = torch.zeros_like(c).index_add_(0, a, x) / torch.bincount(a, minlength=256).clamp_min(1)[:, None].float()
    return ((test.pow(2).sum(1) + (c.pow(2).sum(1) - 2 * test @ c.T).min(1).values).mean() / 4).item()


def gaussian(n: int, k: int, seed: int) -> dict:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    codebook_pool(POOL)  # screened once per process; not part of the per-matrix time
    t0 = time.perf_counter()
    ct = code2(w)
    seconds = time.perf_counter() - t0
    q = rtn(w, 2, 64, False, clip_search=True, scale_dtype=torch.bfloat16)
    rows = {
        "w2code": {"mse": (ct.dequantize() - w).pow(2).mean().item(), "bits_per_weight": _bits(wint2.tensor_specs("w", n, k), n * k),
                   "encode_seconds": seconds, "weights_per_second": n * k / seconds},
        "int2 g64 asym RTN + clip search": {"mse": (q.dequantize() - w).pow(2).mean().item(),
                                            "bits_per_weight": _bits(ct_fmt.linear_specs("w", n, k, 2, 64, False, torch.bfloat16), n * k)},
        "reference: k-means 256-point 4-D codebook (fp scale)": {"mse": lloyd_reference(seed), "bits_per_weight": 2.0},
        "rate-distortion bound, 2 bits": {"mse": RD_BOUND_2BIT, "bits_per_weight": 2.0},
    }
    return {"n": n, "k": k, "seed": seed, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussian-n", type=int, default=1536)
    ap.add_argument("--gaussian-k", type=int, default=2560)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    out = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} thread(s), cuda {torch.cuda.is_available()}"}
    g = out["gaussian"] = gaussian(a.gaussian_n, a.gaussian_k, a.seed)
    print(f"\ni.i.d. N(0, 1) [{g['n']}, {g['k']}] (seed {g['seed']}), every stored byte counted:\n")
    print("| scheme | MSE | bits/weight |")
    print("|---|---|---|")
    for name, r in g["rows"].items():
        print(f"| {name} | {r['mse']:.4f} | {r['bits_per_weight']:.3f} |")
    w2 = g["rows"]["w2code"]
    print(f"\nencode: {w2['weights_per_second']:,.0f} weights/s ({w2['encode_seconds']:.1f} s) on {out['machine']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
