"""Print README command 1's table from the files it wrote: OUT/NAME.json (``quantkit eval perplexity --json``)
and, for quantized outputs, OUT/NAME/quantize_report.json. Usage: demo_table.py OUT SOURCE NAME [NAME ...]"""

import json
import sys
from pathlib import Path

from quantkit.inspect import inspect_checkpoint


def main() -> None:
    out, source, *names = sys.argv[1:]
    out = Path(out)
    base = json.loads((out / f"{source}.json").read_text())
    rows = [("model", "perplexity", "vs source", "size on disk", "bits/weight (quantized part / overall)")]
    for name in [source, *names]:
        ppl = json.loads((out / f"{name}.json").read_text())["perplexity"]
        report = out / name / "quantize_report.json"
        if report.is_file():
            r = json.loads(report.read_text())
            rows.append((name, f"{ppl:.2f}", f"{ppl / base['perplexity']:.3f}x", f"{r['size_bytes'] / 1e6:.1f} MB",
                         f"{r['bits_per_weight_quantized']:.2f} / {r['bits_per_weight_overall']:.2f}"))
        else:
            r = inspect_checkpoint(base["model"])
            rows.append((f"{name} ({base['model']})", f"{ppl:.2f}", "1.000x", f"{r['tensor_bytes'] / 1e6:.1f} MB",
                         f"{r['bits_per_weight']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"perplexity on {base['data']}: {base['tokens']} predicted tokens ({base['windows']} windows x {base['seq_len']})")
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
