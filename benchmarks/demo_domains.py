"""Does the demo MoE generalize? Perplexity of models on several text domains, each against a reference.

    python benchmarks/demo_domains.py [--models demo:smollm2-dense demo:smollm2-moe ...]
        [--domains shakespeare,pydoc:test,sotu:test,peoples-daily:test] [--seq-len 512] [--max-windows 30]
        [--json benchmarks/results/demo_domains_cpu.json [--resume]] [--table]

The first model is the reference (the dense SmolLM2): every other model's perplexity on a domain is
divided by the reference's on the same tokens. Models are built-in names or directories; a demo variant
is ``demo:smollm2-moe?FIELD=VALUE&...`` (a recipe field changed, e.g. ``?calib_data=sotu:train``).
Whether a domain is held out depends on the model's build data (``calib_data`` in its quantkit_demo.json,
recorded per row): the table marks a domain "seen" when its corpus name is among the build's.
fp32 compute on CPU; each model's row is saved as soon as it is measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

import torch

import quantkit
from quantkit.evals.data import load_text
from quantkit.evals.perplexity import perplexity, tokenize_for_windows
from quantkit.sources import resolve

DOMAINS = "shakespeare,pydoc:test,sotu:test,peoples-daily:test"


def build_corpora(path: Path) -> list[str]:
    """The corpus names a demo was built from (empty for models without a quantkit_demo.json recipe)."""
    stats = path / "quantkit_demo.json"
    if not stats.is_file():
        return []
    data = json.loads(stats.read_text()).get("recipe", {}).get("calib_data", "sotu:train")
    return [p.split(":")[0] for p in data.split("+") if p]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["demo:smollm2-dense", "demo:smollm2-moe"])
    ap.add_argument("--domains", default=DOMAINS)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --json (same settings)")
    ap.add_argument("--table", action="store_true", help="only print the table of --json")
    a = ap.parse_args()
    domains = [d for d in a.domains.split(",") if d]
    settings = {"domains": domains, "seq_len": a.seq_len, "max_windows": a.max_windows}
    rows: list[dict] = []
    if a.resume or a.table:
        if not a.json or not Path(a.json).exists():
            raise SystemExit("--resume / --table need an existing --json file")
        old = json.loads(Path(a.json).read_text())
        if not a.table and any(old.get(k) != v for k, v in settings.items()):
            raise SystemExit(f"--resume: {a.json} was measured with other settings")
        rows, settings = old["rows"], {k: old[k] for k in settings}
    if not a.table:
        torch.set_grad_enabled(False)
        machine = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
                              f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)"}
        for name in a.models:
            if any(r["model"] == name for r in rows):
                print(f"{name}: kept from {a.json}", flush=True)
                continue
            path = resolve(name)
            model = quantkit.load(path, dtype=torch.float32)
            tok = quantkit.load_tokenizer(path)
            ppl = {}
            for d in domains:
                ids = tokenize_for_windows(tok, load_text(d), a.seq_len, a.max_windows)
                r = perplexity(model, ids, a.seq_len, a.max_windows, model_name=name, data_name=d, progress=False)
                ppl[d] = {"perplexity": r.perplexity, "tokens": r.tokens}
                print(f"{name} on {d}: {r.perplexity:.3f} ({r.tokens} tokens)", flush=True)
            rows.append({"model": name, "build_corpora": build_corpora(path), "perplexity": ppl,
                         "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         **machine})
            if a.json:
                Path(a.json).write_text(json.dumps({**settings, "rows": rows}, indent=2) + "\n")
    print_table(rows, settings["domains"])


def print_table(rows: list[dict], domains: list[str]) -> None:
    ref = rows[0]
    print(f"\nperplexity (x {ref['model']}); '(seen)': the model was built from that corpus's train split\n")
    print("| model | " + " | ".join(domains) + " |")
    print("|---|" + "---|" * len(domains))
    for r in rows:
        cells = []
        for d in domains:
            p = r["perplexity"][d]["perplexity"]
            seen = " (seen)" if d.split(":")[0] in r["build_corpora"] else ""
            cells.append(f"{p:.2f}" if r is ref else f"{p:.2f} ({p / ref['perplexity'][d]['perplexity']:.2f}x){seen}")
        print(f"| {r['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
