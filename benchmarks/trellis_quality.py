"""Gaussian quality and encode speed of the trellis code against the 2-bit code, int2 g64 and the bound.

    python benchmarks/trellis_quality.py [--rows 128] [--state-bits 16,12,10,8] [--codes] [--json FILE]

For each ERNIE-4.5-21B expert shape (N, K) = (1536, 2560) (gate/up) and (2560, 1536) (down), an i.i.d.
unit-Gaussian [N, K] matrix; every scheme encodes the same first ``--rows`` output rows (default 128: one
full 128-row Hadamard block, so those rows are rotated exactly as in the whole matrix; the 2-bit code and
int2 are row-wise anyway). MSE is per weight on those rows; bits/weight counts every stored byte at the
full [N, K] shape (trellis: 2-bit words + fp16 suh/svh; the 2-bit code: codes, local, super, code
scale/zero point; int2: codes, bf16 scales and packed zero points). Encode throughput is weights/s on this
machine, one thread. ``--state-bits`` lists the trellis state sizes L to run (16 is the format's default;
smaller L is the CPU option, and its cost in MSE is what this table shows).

``--codes`` adds the code choice: tail-biting Viterbi at L = 12 on 64 unit-Gaussian sequences for the
compute-only codes the research names (MUL1, 1MAD, 3INST; each table scaled to unit RMS).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from quantkit.format import compressed_tensors as ct_fmt
from quantkit.format import trellis as fmt
from quantkit.format import wint2
from quantkit.quant.code2 import POOL, code2, codebook_pool
from quantkit.quant.rtn import rtn
from quantkit.quant.trellis import encode_tiles, trellis

RD_BOUND_2BIT = 2.0 ** -4
SHAPES = ((1536, 2560), (2560, 1536))


def _bits(specs, weights: int) -> float:
    return 8 * sum(s.nbytes for s in specs) / weights


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def shape_rows(n: int, k: int, rows: int, state_bits: list[int], seed: int) -> dict:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))[:rows]
    weights = rows * k
    out = {}
    for L in state_bits:
        tt, sec = _timed(lambda: trellis(w, bits=2, L=L))
        out[f"trellis K=2 L={L}"] = {"mse": (tt.dequantize() - w).pow(2).mean().item(),
                                     "bits_per_weight": _bits(fmt.tensor_specs("w", n, k, 2), n * k),
                                     "encode_seconds": sec, "weights_per_second": weights / sec}
        print(f"  [{n}, {k}] trellis L={L}: mse {out[f'trellis K=2 L={L}']['mse']:.4f}, {weights / sec:,.0f} w/s",
              flush=True)
    codebook_pool(POOL)  # screened once per process; not part of the per-matrix time
    ct, sec = _timed(lambda: code2(w))
    out["2-bit code (w2code)"] = {"mse": (ct.dequantize() - w).pow(2).mean().item(),
                                  "bits_per_weight": _bits(wint2.tensor_specs("w", n, k), n * k),
                                  "encode_seconds": sec, "weights_per_second": weights / sec}
    q = rtn(w, 2, 64, False, clip_search=True, scale_dtype=torch.bfloat16)
    out["int2 g64 asym RTN + clip search"] = {
        "mse": (q.dequantize() - w).pow(2).mean().item(),
        "bits_per_weight": _bits(ct_fmt.linear_specs("w", n, k, 2, 64, False, torch.bfloat16), n * k)}
    out["rate-distortion bound, 2 bits"] = {"mse": RD_BOUND_2BIT, "bits_per_weight": 2.0}
    return {"n": n, "k": k, "rows_encoded": rows, "seed": seed, "rows": out}


def code_tables(L: int) -> dict[str, torch.Tensor]:
    """Values of every L-bit state for the candidate codes (QTIP's 1MAD and 3INST, EXL3's MUL1), unit RMS."""
    s = torch.arange(1 << L, dtype=torch.int64)

    def bytesum(x):
        return sum((x >> (8 * i)) & 0xFF for i in range(4)).float()

    x = (s * 34038481 + 76625530) & 0xFFFFFFFF
    mad = bytesum(x) - 510
    y = (((s * 89226354 + 64248484) & 0xFFFFFFFF) & 0x8FFF8FFF) ^ 0x3B603B60
    def fp16(bits16):  # reinterpret 16 bits as an fp16 value
        return (((bits16 + 0x8000) & 0xFFFF) - 0x8000).to(torch.int16).view(torch.float16).float()

    lo, hi = fp16(y & 0xFFFF), fp16(y >> 16)
    tables = {"MUL1 (the format's)": fmt.value_table(L), "1MAD": mad, "3INST": lo + hi}
    return {name: t / t.pow(2).mean().sqrt() for name, t in tables.items()}


def codes(L: int, seed: int, tiles: int = 64) -> dict:
    x = torch.randn(tiles, fmt.T, generator=torch.Generator().manual_seed(seed + 7))
    out = {}
    for name, table in code_tables(L).items():
        s = encode_tiles(x, 2, L, table=table)
        out[name] = (table[s] - x).pow(2).mean().item()
        print(f"  code {name}, L={L}: mse {out[name]:.4f}", flush=True)
    return {"L": L, "sequences": tiles, "mse": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--state-bits", default="16,12,10,8")
    ap.add_argument("--codes", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    state_bits = [int(v) for v in a.state_bits.split(",")]
    out = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
                      f"{torch.get_num_threads()} thread(s), cuda {torch.cuda.is_available()}", "shapes": []}
    if a.codes:
        out["codes"] = codes(12, a.seed)
    for n, k in SHAPES:
        out["shapes"].append(shape_rows(n, k, a.rows, state_bits, a.seed))
    for g in out["shapes"]:
        print(f"\ni.i.d. N(0, 1) [N={g['n']}, K={g['k']}], first {g['rows_encoded']} rows, every stored byte counted:\n")
        print("| scheme | MSE | bits/weight | encode weights/s |")
        print("|---|---|---|---|")
        for name, r in g["rows"].items():
            wps = f"{r['weights_per_second']:,.0f}" if "weights_per_second" in r else "-"
            print(f"| {name} | {r['mse']:.4f} | {r['bits_per_weight']:.3f} | {wps} |")
    if "codes" in out:
        c = out["codes"]
        print(f"\ncodes, L={c['L']}, {c['sequences']} unit-Gaussian sequences: " +
              ", ".join(f"{k} {v:.4f}" for k, v in c["mse"].items()))
    print(f"\non {out['machine']}")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
