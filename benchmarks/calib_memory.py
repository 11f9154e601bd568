"""Streaming quantization at real dimensions: peak RSS does not grow with the number of layers.

    python benchmarks/calib_memory.py [--src 'random:ernie-21b-a3b?layers={layers}'[,...]] [--layers 2,4]
                                      [--samples 4] [--seq-len 256] [--method gptq|rtn|awq] [--device cpu]
                                      [--json benchmarks/results/calib_memory_cpu.json]

``--src`` is a comma list of source templates (``{layers}`` is replaced by each ``--layers`` value), e.g. every
family's real-dimension random source (``random:<family>-real?layers={layers}``). Each run is a separate process
(``quantkit quantize``) so its peak RSS is its own; the figures come from that run's quantize_report.json. Also
prints the ``--dry-run`` estimate. ``rtn`` needs no calibration data (the streaming reader and writer alone).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def run(template: str, layers: int, a) -> dict:
    src = template.format(layers=layers)
    subprocess.run([sys.executable, "-c", f"from quantkit.sources import resolve; resolve({src!r})"], check=True)
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        out = Path(tmp) / "out"
        common = [src, "-o", str(out), "--method", a.method, "--recipe", "w4g128", "--device", a.device]
        if a.method != "rtn":
            common += ["--calib", "sotu:train", "--calib-samples", str(a.samples), "--calib-seq-len", str(a.seq_len)]
        dry = subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", *common, "--dry-run"],
                             check=True, capture_output=True, text=True).stdout
        subprocess.run([sys.executable, "-m", "quantkit.cli", "quantize", *common], check=True)
        rep = json.loads((out / "quantize_report.json").read_text())
    moe = [l["seconds"] for l in rep["layers"] if l["moe"]]
    return {"src": src, "layers": layers, "peak_rss_bytes": rep["peak_rss_bytes"], "seconds": rep["seconds"],
            "seconds_per_moe_layer": sum(moe) / len(moe) if moe else None, "moe_layer_seconds": moe,
            "dry_run_peak_host": next(l for l in dry.splitlines() if "peak host memory" in l).strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="random:ernie-21b-a3b?layers={layers}")
    ap.add_argument("--layers", default="2,4")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--drop-sources", action="store_true", help="delete each random source from the cache after its run")
    a = ap.parse_args()
    rows = []
    for template in a.src.split(","):
        for n in a.layers.split(","):
            rows.append(run(template, int(n), a))
            if a.json:  # after every run: a long job that dies keeps what it measured
                Path(a.json).write_text(json.dumps({"method": a.method, "samples": a.samples, "seq_len": a.seq_len,
                                                    "device": a.device, "threads": torch.get_num_threads(),
                                                    "rows": rows}, indent=2) + "\n")
            if a.drop_sources:  # real-dimension random sources are GBs each and cheap to rebuild
                from quantkit.sources import resolve

                shutil.rmtree(resolve(template.format(layers=n)), ignore_errors=True)
    print(f"\n{a.method}, {a.samples} x {a.seq_len} calibration tokens, device {a.device}\n")
    print("| model | peak RSS | time | s per MoE layer | dry-run estimate |")
    print("|---|---|---|---|---|")
    for r in rows:
        per_layer = f"{r['seconds_per_moe_layer']:.0f} s" if r["seconds_per_moe_layer"] else "-"
        print(f"| {r['src'].split('?')[0]}, {r['layers']} layers | {r['peak_rss_bytes'] / 1e9:.2f} GB | "
              f"{r['seconds']:.0f} s | {per_layer} | {r['dry_run_peak_host']} |")

if __name__ == "__main__":
    main()
