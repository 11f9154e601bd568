"""Calibration + GPTQ at ERNIE-21B-A3B dimensions: peak RSS does not grow with the number of layers.

    python benchmarks/calib_memory.py [--layers 2,4] [--samples 4] [--seq-len 256] [--method gptq] [--device cpu]
                                      [--json benchmarks/results/calib_memory_cpu.json]

Each run is a separate process (``quantkit quantize ... --method gptq``) so its peak RSS is its own;
the figures come from that run's quantize_report.json. Also prints the ``--dry-run`` estimate.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def run(layers: int, a) -> dict:
    src = f"random:ernie-21b-a3b?layers={layers}"
    subprocess.run([sys.executable, "-c", f"from quantkit.sources import resolve; resolve({src!r})"], check=True)
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        out = Path(tmp) / "out"
        common = [src, "-o", str(out), "--method", a.method, "--recipe", "w4g128", "--calib", "sotu:train",
                  "--calib-samples", str(a.samples), "--calib-seq-len", str(a.seq_len), "--device", a.device]
        dry = subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", *common, "--dry-run"],
                             check=True, capture_output=True, text=True).stdout
        subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", *common], check=True)
        rep = json.loads((out / "quantize_report.json").read_text())
    moe = [l["seconds"] for l in rep["layers"] if l["moe"]]
    return {"layers": layers, "peak_rss_bytes": rep["peak_rss_bytes"], "seconds": rep["seconds"],
            "seconds_per_moe_layer": sum(moe) / len(moe), "moe_layer_seconds": moe,
            "dry_run_peak_host": next(l for l in dry.splitlines() if "peak host memory" in l).strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for n in a.layers.split(","):
        rows.append(run(int(n), a))
        if a.json:  # after every run: a long job that dies keeps what it measured
            Path(a.json).write_text(json.dumps({"method": a.method, "samples": a.samples, "seq_len": a.seq_len,
                                                "device": a.device, "threads": torch.get_num_threads(), "rows": rows},
                                               indent=2) + "\n")
    print(f"\n{a.method}, {a.samples} x {a.seq_len} calibration tokens, device {a.device}\n")
    print("| model | peak RSS | time | s per MoE layer | dry-run estimate |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| 21B-A3B dims, {r['layers']} layers | {r['peak_rss_bytes'] / 1e9:.2f} GB | {r['seconds']:.0f} s | "
              f"{r['seconds_per_moe_layer']:.0f} s | {r['dry_run_peak_host']} |")


if __name__ == "__main__":
    main()
