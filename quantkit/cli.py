"""The ``quantkit`` command: a thin click layer over the Python API (no logic of its own).

User errors (``QuantkitError``) print one line and exit 2 (bad usage/input) or 1 (failure).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
from pathlib import Path

import click

from quantkit import __version__
from quantkit.errors import QuantkitError


def _friendly(fn):
    """Turn QuantkitError into one line on stderr and its exit code; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QuantkitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


DEVICE = click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
DTYPE = click.option("--dtype", default=None, help="bfloat16|float16|float32 (default: the checkpoint's)")
BACKEND = click.option("--backend", type=click.Choice(["auto", "triton", "torch"]), default="auto", show_default=True,
                       help="quantized layers: Triton kernels (CUDA) or torch dequant+matmul; auto = triton on CUDA")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="quantkit")
def main():
    """Quantize Mixture-of-Experts LLMs to 4/2 bits and run them.

    SRC is an HF checkpoint directory, a Hub id ORG/NAME[@REVISION] (through huggingface_hub and its
    cache; HF_HUB_OFFLINE=1 uses the cache only) or a built-in model: random:ernie-tiny,
    random:ernie-21b-a3b?layers=N, demo:smollm2-moe, demo:smollm2-dense.
    """


@main.group("eval")
def eval_group():
    """Evaluate a model."""


@eval_group.command("perplexity")
@click.argument("src")
@click.option("--data", required=True, help="a .txt/.jsonl/.parquet file or directory, a built-in corpus (sotu, peoples-daily, shakespeare, pydoc; NAME:train / NAME:test splits), or hf:PATH[:CONFIG]:SPLIT")
@click.option("--seq-len", default=2048, show_default=True, type=int, help="tokens per window")
@click.option("--max-windows", default=None, type=int, help="evaluate at most N windows")
@DEVICE
@DTYPE
@BACKEND
@click.option("--json", "json_path", default=None, type=click.Path(dir_okay=False), help="write the result as JSON here")
@_friendly
def perplexity_cmd(src, data, seq_len, max_windows, device, dtype, backend, json_path):
    """Perplexity of SRC on DATA (non-overlapping windows, documents joined by blank lines)."""
    from quantkit.evals.perplexity import evaluate_perplexity

    r = evaluate_perplexity(src, data, seq_len, max_windows, device=device, dtype=dtype, backend=backend)
    click.echo(f"perplexity {r.perplexity:.4f}  (nll {r.nll:.4f}, {r.tokens} tokens, {r.windows} windows x {r.seq_len}, "
               f"model {r.model}, data {r.data}, {r.seconds:.1f}s)")
    if json_path:
        keys = ("perplexity", "nll", "tokens", "seq_len", "windows", "model", "data")
        Path(json_path).write_text(json.dumps({k: getattr(r, k) for k in keys}, indent=2) + "\n")


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*", text, re.IGNORECASE)
    if not m:
        raise QuantkitError(f"bad size {text!r}: use e.g. 4GB, 500MB or a number of bytes", exit_code=2)
    unit = (m.group(2) or "").upper().replace("I", "").rstrip("B")
    return int(float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[unit])


@main.command("quantize")
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="output directory")
@click.option("--recipe", default=None, help="built-in recipe (w4g128, w4g128-asym, w3g128, w2g64, w8, w2code, "
              "w2code-w4edges, w2g64-experts, w2trellis) or a .json/.yaml file")
@click.option("--bits", type=click.Choice(["2", "3", "4", "8"]), default=None, help="simple case instead of --recipe")
@click.option("--bits-per-weight", type=float, default=None,
              help="bit budget B for the trellis-coded routed experts: K = 2/3/4 per tensor from measured sensitivity, "
              "every stored byte counted (recipe default: w2trellis; --dry-run shows the K chosen)")
@click.option("--group-size", default="128", show_default=True, help="32, 64, 128 or channel")
@click.option("--sym/--asym", default=None, help="symmetric (default for 4/8 bits) or asymmetric (default for 2/3 bits)")
@click.option("--method", type=click.Choice(["rtn", "gptq", "awq", "awq+gptq"]), default="rtn", show_default=True)
@click.option("--clip-search/--no-clip-search", default=None,
              help="MSE-optimal clipping per group (default: on for gptq/awq, off for rtn; --no-clip-search is faster)")
@click.option("--calib", "calib_data", default=None, help="calibration DATA (default: sotu:train+peoples-daily:train)")
@click.option("--calib-samples", default=128, show_default=True, type=int, help="calibration windows")
@click.option("--calib-seq-len", default=2048, show_default=True, type=int, help="tokens per calibration window")
@click.option("--expert-calibration", type=click.Choice(["routed", "all"]), default="routed", show_default=True,
              help="routed: experts see their routed tokens; all: every token reaches every expert's statistics")
@click.option("--prob-weighted", is_flag=True, help="weight each token's Hessian contribution by its routing weight")
@click.option("--min-expert-tokens", default=8, show_default=True, type=int, help="below this an expert falls back to RTN")
@click.option("--calib-memory", default="4GB", show_default=True, help="hidden states kept in memory; the rest spills to disk")
@click.option("--seed", default=0, show_default=True, type=int)
@DEVICE
@click.option("--max-shard-size", default="4GB", show_default=True)
@click.option("--export", type=click.Choice(["quantkit", "fastdeploy"]), default="quantkit", show_default=True,
              help="fastdeploy: FastDeploy's wint2 checkpoint (Paddle format, ernie.* names, 2-bit-code experts, wint8 dense layers)")
@click.option("--server", default=None, help="refuse (before any work) a plan this server could not load: "
              "vllm, fastdeploy, transformers or quantkit")
@click.option("--tp", default=1, show_default=True, type=int, help="tensor-parallel size the --server check assumes")
@click.option("--force", is_flag=True, help="replace a non-empty output directory")
@click.option("--resume", is_flag=True, help="continue an interrupted run with the same inputs (its .OUT.partial directory)")
@click.option("--dry-run", is_flag=True, help="print the plan and the memory/disk estimates from config.json; quantize nothing")
@_friendly
def quantize_cmd(src, out, recipe, bits, bits_per_weight, group_size, sym, method, clip_search, calib_data, calib_samples, calib_seq_len,
                 expert_calibration, prob_weighted, min_expert_tokens, calib_memory, seed, device, max_shard_size, export, server,
                 tp, force, resume, dry_run):
    """Quantize SRC into a compressed-tensors checkpoint at OUTPUT (streams one layer at a time)."""
    from quantkit.calib.data import DEFAULT_CALIB
    from quantkit.pipeline.quantize import CalibOptions, QuantizeOptions, format_summary, quantize
    from quantkit.quant.config import get_recipe, simple_recipe

    if recipe and bits:
        raise QuantkitError("give either --recipe or --bits/--group-size/--sym, not both", exit_code=2)
    if bits and bits_per_weight is not None:
        raise QuantkitError("--bits-per-weight picks the trellis code's bits per tensor; it does not combine with --bits",
                            exit_code=2)
    if bits:
        gs = None if group_size == "channel" else int(group_size) if group_size.isdigit() else group_size
        if isinstance(gs, str):
            raise QuantkitError(f"bad --group-size {group_size!r}: use 32, 64, 128 or channel", exit_code=2)
        r = simple_recipe(int(bits), gs, sym if sym is not None else int(bits) >= 4)
    else:
        r = get_recipe(recipe or ("w4g128" if bits_per_weight is None else "w2trellis"))
    r = r.with_method(method, clip_search)
    if bits_per_weight is not None:
        r = dataclasses.replace(r, bits_per_weight=bits_per_weight)
    calib = CalibOptions(data=calib_data or DEFAULT_CALIB, samples=calib_samples, seq_len=calib_seq_len, seed=seed,
                         expert_calibration=expert_calibration, prob_weighted=prob_weighted, min_expert_tokens=min_expert_tokens,
                         memory_budget=_parse_size(calib_memory))
    options = QuantizeOptions(device=device, max_shard_bytes=_parse_size(max_shard_size), force=force, calib=calib, export=export,
                              server=server, tp=tp)
    if dry_run:
        from quantkit.pipeline.dry_run import dry_run as plan_only, format_dry_run

        click.echo(format_dry_run(plan_only(src, r, options)))
        return
    report = quantize(src, out, r, options, resume_run=resume)
    click.echo(format_summary(report))


@main.command("rotate")
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(file_okay=False), help="output directory")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the random orthogonal rotation")
@_friendly
def rotate_cmd(src, out, seed):
    """Fold an orthogonal rotation of the residual stream into the weights (same fp logits, same architecture);
    quantize the result as any checkpoint."""
    from quantkit.sources import resolve
    from quantkit.transforms.rotate import rotate_checkpoint

    click.echo(str(rotate_checkpoint(resolve(src), out, seed)))


@main.command("inspect")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of text")
@_friendly
def inspect_cmd(path, as_json):
    """What a checkpoint holds: format, per-module schemes, bits/weight, size, experts, unquantized tensors."""
    from quantkit.inspect import format_inspect, inspect_checkpoint

    r = inspect_checkpoint(path)
    click.echo(json.dumps(r, indent=2) if as_json else format_inspect(r))


@main.command("check")
@click.argument("path")
@click.option("--server", "servers", multiple=True, help="vllm, fastdeploy, transformers or quantkit (repeatable; "
              "default: all)")
@click.option("--tp", default=1, show_default=True, type=int, help="tensor-parallel size to check for")
@_friendly
def check_cmd(path, servers, tp):
    """Whether a server can load the checkpoint at PATH, from its config and tensor headers.

    Exit 0 when every server asked would load it (one line each), 1 otherwise (one line per reason)."""
    from quantkit.serving import SERVERS, CheckpointView, check, format_verdict
    from quantkit.sources import resolve

    for s in servers:
        if s not in SERVERS:
            raise QuantkitError(f"unknown server {s!r}: use one of {', '.join(SERVERS)}", exit_code=2)
    where = resolve(path)
    view = CheckpointView.from_dir(where)
    refused = False
    for s in servers or SERVERS:
        reasons = check(view, s, tp)
        refused |= bool(reasons)
        for line in format_verdict(s, reasons, tp, str(where)):
            click.echo(line)
    sys.exit(1 if refused else 0)


@main.command("report")
@click.argument("out")
@click.option("--dest", default=None, type=click.Path(file_okay=False), help="where to write the PNGs (default: OUT)")
@_friendly
def report_cmd(out, dest):
    """Plot a calibrated run: expert coverage heatmap (layer x expert) and error per layer, as PNGs."""
    from quantkit.evals.report import render_report

    for p in render_report(out, dest):
        click.echo(str(p))


@main.command("generate")
@click.argument("src")
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", default=48, show_default=True, type=int)
@click.option("--sample/--greedy", default=False, show_default=True)
@click.option("--temperature", default=0.8, show_default=True, type=float)
@click.option("--top-p", default=0.95, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int)
@DEVICE
@DTYPE
@BACKEND
@_friendly
def generate_cmd(src, prompt, max_new_tokens, sample, temperature, top_p, seed, device, dtype, backend):
    """Continue PROMPT with SRC (greedy by default)."""
    import torch

    import quantkit

    tok = quantkit.load_tokenizer(src)
    model = quantkit.load(src, device=device, dtype=dtype, backend=backend)
    ids = tok.encode(prompt)
    if not ids:
        raise QuantkitError("the prompt tokenizes to nothing", exit_code=2)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature,
                         top_p=top_p, generator=gen)
    click.echo(prompt + tok.decode(out[0, len(ids):].tolist()))


if __name__ == "__main__":
    main()
