"""Quality and speed of the 2-bit convolutional code (CCQ / FastDeploy WINT2) against int2 g64.

    python benchmarks/code2_quality.py [--gaussian-n 1536] [--gaussian-k 2560] [--skip-demo]
        [--src demo:smollm2-moe] [--data sotu:test] [--seq-len 512] [--max-windows 40]
        [--rows bf16,w2code:rtn,w2code:gptq,w2g64-experts:rtn,w2g64-experts:gptq]
        [--calib sotu:train --calib-samples 32 --calib-seq-len 512] [--json FILE]

Part 1, i.i.d. unit-Gaussian [N, K] matrix: per-weight MSE and bits per weight (every stored byte counted:
codes, 4-bit local scales, bf16 super scales, fp32 code scale/zero point) of the 2-bit code, of int2
g64 asymmetric RTN with the MSE clipping search (bf16 scales), and the rate-distortion bound at 2 bits
(2^-4 = 0.0625); encode throughput (weights/s) on this machine. A reference row: the best unstructured
256-point 4-D codebook we can train (Lloyd / k-means on 100k Gaussian 4-tuples, tested on fresh ones,
unquantized scale): what any one-byte-per-4-weights code with a fixed codebook can reach at best.
Part 2, the demo model: perplexity of each row's recipe. ``w2code`` and ``w2g64-experts`` keep every
non-expert module at w4g128 (the router unquantized), so the rows differ only in the routed experts.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import quantkit
from quantkit.evals.data import load_text
from quantkit.evals.perplexity import perplexity, tokenize_for_windows
from quantkit.format import compressed_tensors as ct_fmt
from quantkit.format import wint2
from quantkit.pipeline.quantize import CalibOptions, QuantizeOptions, quantize
from quantkit.quant.code2 import POOL, code2, codebook_pool
from quantkit.quant.config import get_recipe
from quantkit.quant.rtn import rtn
from quantkit.sources import resolve

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


def demo(a) -> dict:
    src = resolve(a.src)
    ids = tokenize_for_windows(quantkit.load_tokenizer(src), load_text(a.data), a.seq_len, a.max_windows)
    work = Path(tempfile.mkdtemp(prefix="quantkit-code2-"))
    calib = CalibOptions(data=a.calib, samples=a.calib_samples, seq_len=a.calib_seq_len)
    rows = []
    for row in a.rows.split(","):
        recipe, _, method = row.partition(":")
        t0 = time.perf_counter()
        if recipe == "bf16":
            path, rep = src, None
        else:
            path = work / row.replace(":", "-")
            rep = quantize(str(src), path, get_recipe(recipe).with_method(method or "rtn"),
                           QuantizeOptions(force=True, progress=False, calib=calib))
        r = perplexity(quantkit.load(path), ids, a.seq_len, a.max_windows, model_name=row, data_name=a.data)
        rows.append({"row": row, "perplexity": r.perplexity, "tokens": r.tokens, "seconds": round(time.perf_counter() - t0, 1),
                     "bits_per_weight_parts": None if rep is None else rep["bits_per_weight_parts"],
                     "bits_per_weight_overall": None if rep is None else rep["bits_per_weight_overall"]})
        print(f"{row}: ppl {r.perplexity:.3f}", flush=True)
        if path != src:
            shutil.rmtree(path)
    return {"src": a.src, "data": a.data, "seq_len": a.seq_len, "max_windows": a.max_windows, "calib": a.calib,
            "calib_samples": a.calib_samples, "calib_seq_len": a.calib_seq_len, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gaussian-n", type=int, default=1536)
    ap.add_argument("--gaussian-k", type=int, default=2560)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-gaussian", action="store_true")
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--src", default="demo:smollm2-moe")
    ap.add_argument("--data", default="sotu:test")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--rows", default="bf16,w2code:rtn,w2code:gptq,w2g64-experts:rtn,w2g64-experts:gptq")
    ap.add_argument("--calib", default="sotu:train")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    out = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} thread(s), cuda {torch.cuda.is_available()}"}
    if not a.skip_gaussian:
        g = out["gaussian"] = gaussian(a.gaussian_n, a.gaussian_k, a.seed)
        print(f"\ni.i.d. N(0, 1) [{g['n']}, {g['k']}] (seed {g['seed']}), every stored byte counted:\n")
        print("| scheme | MSE | bits/weight |")
        print("|---|---|---|")
        for name, r in g["rows"].items():
            print(f"| {name} | {r['mse']:.4f} | {r['bits_per_weight']:.3f} |")
        w2 = g["rows"]["w2code"]
        print(f"\nencode: {w2['weights_per_second']:,.0f} weights/s ({w2['encode_seconds']:.1f} s) on {out['machine']}")
    if not a.skip_demo:
        d = out["demo"] = demo(a)
        base = d["rows"][0]["perplexity"]
        print(f"\n{a.src} on {a.data}: seq_len {a.seq_len}, {d['rows'][0]['tokens']} predicted tokens; calibration "
              f"(gptq rows) {a.calib}, {a.calib_samples} x {a.calib_seq_len} tokens; non-experts w4g128 in every quantized row\n")
        print("| recipe:method | perplexity | gap to first row | routed experts bits/weight | overall bits/weight |")
        print("|---|---|---|---|---|")
        for r in d["rows"]:
            parts = r["bits_per_weight_parts"] or {}
            experts = next((v["bits_per_weight"] for k, v in parts.items() if "routed experts" in k), None)
            fmt = lambda x: "-" if x is None else f"{x:.3f}"
            print(f"| {r['row']} | {r['perplexity']:.3f} | {r['perplexity'] - base:+.3f} | {fmt(experts)} | {fmt(r['bits_per_weight_overall'])} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
