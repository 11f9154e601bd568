"""quantkit against llm-compressor on the same model, calibration tokens and evaluation tokens.

    python benchmarks/peers.py [--peer-venv ~/.cache/quantkit/peer-venv] [--schemes w4g64-sym,w2g64-asym]
        [--methods rtn,gptq,awq,awq+gptq] [--eval peoples-daily:test] [--moe] [--json out.json [--resume]]

Model: ``demo:smollm2-dense`` (SmolLM2-135M as a dense ERNIE checkpoint, bf16) for quantkit, as an fp32
copy (the peer loads its model in fp32, so both keep fp32 scales: with them the two RTNs give identical
weights), and the same tensors written as a transformers ``LlamaForCausalLM`` checkpoint for the peer
(q/k rows permuted from ERNIE's interleaved RoPE layout to Llama's rotate-half one; nothing else changes). One tokenizer (the
demo's), one set of calibration windows (``calibration_windows``: 32 x 512 of ``sotu:train``, seed 0,
the windows ``quantkit quantize`` draws, handed to llm-compressor as token ids), one cut of evaluation
windows (30 x 512, held out and of another domain than the calibration), one NLL code path
(``quantkit.evals.perplexity.perplexity``) for every row: quantkit's outputs through ``quantkit.load``,
llm-compressor's as its dequantized weights inside transformers' Llama. Before any row, both fp models
must give the same perplexity, and each peer row checks that the dequantized weights reproduce
llm-compressor's own logits on one window.

llm-compressor (pinned below) lives in its own venv, created here on first use (torch 2.13.0 CPU first,
so pip does not pull a CUDA build); it is never a dependency of quantkit. Both sides run with the same
torch thread count, one run at a time. Times: quantkit's whole ``quantize()`` (read, calibrate,
quantize, write) against the peer's model load + ``oneshot()`` + compressed ``save_pretrained`` (the
JSON also holds each part).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import fields, replace
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import quantkit
from quantkit.calib.data import calibration_windows
from quantkit.evals.data import load_text
from quantkit.evals.perplexity import perplexity, tokenize_for_windows
from quantkit.pipeline.quantize import CalibOptions, QuantizeOptions, quantize
from quantkit.quant.config import Rule, simple_recipe
from quantkit.sources import cache_root, resolve
from quantkit.sources.gguf_llama import interleaved_to_half
from quantkit.tokenizer import Tokenizer

PEER_PINS = ("torch==2.13.0", "llmcompressor==0.14.0.1")
WORKER = Path(__file__).with_name("peer_llmc.py")
SCHEMES = {"w4g64-sym": (4, 64, True), "w2g64-asym": (2, 64, False), "w4g128-sym": (4, 128, True)}


def ensure_peer_venv(path: Path) -> Path:
    """The peer venv's python, creating the venv and installing the pins if llmcompressor is missing."""
    py = path / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import llmcompressor"], capture_output=True).returncode == 0
    if not ok:
        print(f"[peers] creating the llm-compressor venv in {path} ({', '.join(PEER_PINS)})", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        for pin in PEER_PINS:  # torch first: llmcompressor's torch requirement is then already met
            subprocess.run([str(py), "-m", "pip", "install", "-q", pin], check=True)
    return py


def write_llama(src: Path, dst: Path) -> Path:
    """The dense ERNIE demo's tensors as a transformers Llama checkpoint (same names; q/k rows to rotate-half)."""
    cfg = json.loads((src / "config.json").read_text())
    if any(cfg.get(k, 0) < cfg["num_hidden_layers"] for k in ("moe_layer_start_index",)):
        raise SystemExit(f"{src} is not a dense ERNIE checkpoint (it has MoE layers)")
    if (dst / "config.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    w = load_file(str(src / "model.safetensors"))
    for name in list(w):
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"]
            w[name] = interleaved_to_half(w[name], heads).contiguous()
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": cfg["torch_dtype"],
             **{k: cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                    "num_key_value_heads", "head_dim", "hidden_act", "vocab_size", "rms_norm_eps",
                                    "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                                    "bos_token_id", "eos_token_id", "pad_token_id")},
             "attention_bias": False, "mlp_bias": False}
    (dst / "config.json").write_text(json.dumps(llama, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, dst / f)
    return dst


def write_fp32(src: Path, dst: Path) -> Path:
    """The same checkpoint with every float tensor in fp32 (bf16 values are exact in fp32), so quantkit, like
    llm-compressor on its fp32-loaded model, keeps fp32 scales: both quantize the same fp32 weights."""
    if (dst / "config.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    w = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(w, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}, indent=2) + "\n")
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


class HFLogits:
    """``model(ids [1, T]) -> logits [1, T, V]`` for a transformers causal LM (what ``perplexity`` calls)."""

    def __init__(self, model):
        self.model = model.eval()

    def __call__(self, ids):
        with torch.no_grad():
            return self.model(ids).logits


def dequantized_once(model):
    """``quantkit.load``'s model with each QuantLinear swapped for an nn.Linear holding its dequantized weight
    (the very weight its torch path computes on every call), so 30 evaluation windows do not unpack 30 times."""
    from quantkit.nn.quantized import QuantLinear

    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear):
            lin = torch.nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = mod.weight(torch.float32)
            if mod.bias is not None:
                lin.bias.data = mod.bias.data.float()
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, lin)
    return model


def hf_model(path: Path, weights: dict[str, torch.Tensor] | None = None):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    if weights is not None:
        missing = set(weights) - set(m.state_dict())
        if missing:
            raise RuntimeError(f"peer weights not in the transformers model: {sorted(missing)[:3]} ...")
        m.load_state_dict(weights, strict=False)
    return HFLogits(m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default="demo:smollm2-dense")
    ap.add_argument("--peer-venv", default=str(cache_root() / "peer-venv"))
    ap.add_argument("--schemes", default="w4g64-sym", help=f"comma list of {', '.join(SCHEMES)}")
    ap.add_argument("--methods", default="rtn,gptq,awq,awq+gptq")
    ap.add_argument("--toolkits", default="quantkit,llm-compressor")
    ap.add_argument("--calib", default="sotu:train")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval", default="peoples-daily:test")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quantkit-rule", default="", help="rule fields for the quantkit rows, e.g. act_order=1,clip_search=0 "
                    "(rows are labelled with them; default: quantkit's defaults)")
    ap.add_argument("--rotate", action="store_true", help="quantkit rows quantize the rotated model "
                    "(quantkit rotate, seed 0): same fp function, labelled 'rot'")
    ap.add_argument("--moe", action="store_true", help="also try llm-compressor (GPTQ w4g64) on demo:smollm2-moe")
    ap.add_argument("--json", default=None)
    ap.add_argument("--resume", action="store_true", help="keep rows already in --json (same settings)")
    ap.add_argument("--table", action="store_true", help="only print the table of --json")
    a = ap.parse_args()
    if a.table:
        return print_table(json.loads(Path(a.json).read_text()))
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)

    src = resolve(a.src)
    work = Path(tempfile.mkdtemp(prefix="quantkit-peers-"))
    llama = write_llama(src, cache_root() / "peers" / f"{src.name}-llama")
    src32 = write_fp32(src, cache_root() / "peers" / f"{src.name}-fp32")  # what quantkit quantizes
    if a.rotate:
        from quantkit.transforms.rotate import rotate_checkpoint

        rot = cache_root() / "peers" / f"{src.name}-fp32-rot0"
        src32 = rot if (rot / "config.json").exists() else rotate_checkpoint(src32, rot, seed=0)
    tok = Tokenizer(src)
    ids = torch.tensor(tokenize_for_windows(tok, load_text(a.eval), a.seq_len, a.windows))
    calib = calibration_windows(a.calib, tok, a.calib_samples, a.seq_len, 0)
    torch.save(calib, work / "calib.pt")
    torch.save(ids[None, :a.seq_len].clone(), work / "probe.pt")
    settings = {"src": a.src, "eval": a.eval, "seq_len": a.seq_len, "windows": a.windows, "calib": a.calib,
                "calib_samples": a.calib_samples}
    doc = {**settings, "versions": {"quantkit": quantkit.__version__, "torch": torch.__version__,
                                    "transformers": version("transformers")}, "rows": []}
    if a.resume and a.json and Path(a.json).exists():
        old = json.loads(Path(a.json).read_text())
        if any(old.get(k) != v for k, v in settings.items()):
            raise SystemExit(f"--resume: {a.json} was measured with other settings")
        doc = {**old, "versions": {**old.get("versions", {}), **doc["versions"]}}
    rows = doc["rows"]

    def save():
        if a.json:
            Path(a.json).write_text(json.dumps(doc, indent=2) + "\n")

    def ppl(model, name):
        r = perplexity(model, ids, a.seq_len, a.windows, model_name=name, data_name=a.eval, progress=False)
        print(f"{name}: ppl {r.perplexity:.3f}", flush=True)
        return r

    def have(key):
        return any(r["key"] == key for r in rows)

    if not have("fp"):
        r_q, r_h = ppl(quantkit.load(src), "fp quantkit"), ppl(hf_model(llama), "fp transformers-llama")
        if abs(r_q.nll - r_h.nll) > 1e-4:
            raise SystemExit(f"fp models disagree: quantkit nll {r_q.nll:.6f} vs transformers {r_h.nll:.6f}")
        rows.append({"key": "fp", "toolkit": "-", "method": "fp", "scheme": "-", "perplexity": r_q.perplexity,
                     "nll": r_q.nll, "nll_transformers": r_h.nll, "tokens": r_q.tokens})
        save()
    fp_ppl = next(r for r in rows if r["key"] == "fp")["perplexity"]

    overrides = rule_overrides(a.quantkit_rule)
    peer_py = ensure_peer_venv(Path(a.peer_venv).expanduser()) if "llm-compressor" in a.toolkits else None
    for scheme in a.schemes.split(","):
        bits, group, sym = SCHEMES[scheme]
        for method in a.methods.split(","):
            for kit in a.toolkits.split(","):
                tags = ",".join(filter(None, ["rot" if a.rotate else "", a.quantkit_rule]))
                label = f"quantkit[{tags}]" if kit == "quantkit" and tags else kit
                key = f"{label} {scheme} {method}"
                if have(key):
                    continue
                row = {"key": key, "toolkit": label, "method": method, "scheme": scheme, "threads": a.threads}
                if kit == "quantkit":
                    recipe = simple_recipe(bits, group, sym).with_method(method)
                    recipe = replace(recipe, rules=tuple((p, replace(r, **overrides)) for p, r in recipe.rules))
                    row["rule"] = recipe.rules[0][1].to_dict()
                    calib_opt = CalibOptions(data=a.calib, samples=a.calib_samples, seq_len=a.seq_len, seed=0)
                    t0 = time.perf_counter()
                    quantize(str(src32), work / "q", recipe, QuantizeOptions(force=True, progress=False, calib=calib_opt))
                    row["quantize_seconds"] = time.perf_counter() - t0
                    model = dequantized_once(quantkit.load(work / "q"))
                else:
                    out, rj = work / "peer.safetensors", work / "peer.json"
                    cmd = [str(peer_py), str(WORKER), "--model", str(llama), "--calib", str(work / "calib.pt"),
                           "--method", method, "--bits", str(bits), "--group-size", str(group),
                           "--threads", str(a.threads), "--out", str(out), "--probe", str(work / "probe.pt"),
                           "--json", str(rj)] + (["--sym"] if sym else [])
                    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
                    peer = json.loads(rj.read_text())
                    if not peer["ok"]:
                        raise SystemExit(f"llm-compressor {method} failed: {peer['error']}")
                    row.update({k: peer.get(k) for k in ("quantize_seconds", "load_seconds", "oneshot_seconds", "save_seconds",
                                                         "versions", "quantized_modules")})
                    model = hf_model(llama, load_file(str(out)))
                    own = torch.load(work / "probe.pt.logits")
                    row["probe_max_abs_logit_diff"] = float((model(torch.load(work / "probe.pt")) - own).abs().max())
                r = ppl(model, key)
                row.update({"perplexity": r.perplexity, "nll": r.nll, "gap": r.perplexity - fp_ppl})
                rows.append(row)
                save()

    if a.moe and not have("moe"):
        moe = resolve("demo:smollm2-moe")
        rj = work / "moe.json"
        subprocess.run([str(peer_py), str(WORKER), "--model", str(moe), "--calib", str(work / "calib.pt"),
                        "--method", "gptq", "--bits", "4", "--group-size", "64", "--sym", "--threads", str(a.threads),
                        "--out", str(work / "moe.safetensors"), "--json", str(rj)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
        peer = json.loads(rj.read_text())
        row = {"key": "moe", "toolkit": "llm-compressor", "method": "gptq", "scheme": "w4g64-sym",
               "model": "demo:smollm2-moe", **{k: v for k, v in peer.items() if k not in ("method",)}}
        if peer["ok"]:
            row["perplexity_fp"] = ppl(quantkit.load(moe), "moe fp quantkit").perplexity
            row["perplexity"] = ppl(hf_model(moe, load_file(str(work / "moe.safetensors"))), "moe llm-compressor gptq").perplexity
        rows.append(row)
        save()
    shutil.rmtree(work, ignore_errors=True)
    print_table(doc)


def rule_overrides(spec: str) -> dict:
    """``act_order=1,clip_search=0,damp=0.1`` -> {"act_order": True, "clip_search": False, "damp": 0.1}
    (Rule's bool fields as 0|1, its float fields as numbers)."""
    kinds = {f.name: ("bool" if "bool" in str(f.type) else "float") for f in fields(Rule)
             if "bool" in str(f.type) or str(f.type) == "float"}
    out = {}
    for item in filter(None, spec.split(",")):
        k, _, v = item.partition("=")
        if kinds.get(k) == "bool" and v in ("0", "1"):
            out[k] = v == "1"
            continue
        try:
            out[k] = float(v) if kinds.get(k) == "float" else None
        except ValueError:
            out[k] = None
        if out[k] is None:
            raise SystemExit(f"--quantkit-rule: {item!r} is not FIELD=0|1 or FIELD=NUMBER with FIELD one of {', '.join(sorted(kinds))}")
    return out


def print_table(doc: dict) -> None:
    rows = doc["rows"]
    fp = next(r for r in rows if r["key"] == "fp")
    print(f"\n{doc['src']}: eval {doc['eval']} ({doc['windows']} x {doc['seq_len']}, {fp['tokens']} predicted tokens), "
          f"calibration {doc['calib']} {doc['calib_samples']} x {doc['seq_len']}; torch threads per row in the JSON\n")
    print("| scheme | method | toolkit | perplexity | gap to fp | gap / llm-compressor's | quantize s | s / llm-compressor's |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| fp | - | both | {fp['perplexity']:.3f} | - | - | - | - |")
    peer = {(r["scheme"], r["method"]): r for r in rows if r["toolkit"] == "llm-compressor" and r["key"] != "moe"}
    for r in sorted((r for r in rows if r["key"] not in ("fp", "moe")), key=lambda r: (r["scheme"], r["method"], r["toolkit"])):
        p = peer.get((r["scheme"], r["method"]))
        gap_ratio = "-" if p is None else f"{r['gap'] / p['gap']:.3f}"
        time_ratio = "-" if p is None else f"{r['quantize_seconds'] / p['quantize_seconds']:.2f}"
        print(f"| {r['scheme']} | {r['method']} | {r['toolkit']} | {r['perplexity']:.3f} | {r['gap']:.3f} | {gap_ratio} "
              f"| {r['quantize_seconds']:.0f} | {time_ratio} |")
    moe = next((r for r in rows if r["key"] == "moe"), None)
    if moe is not None:
        print(f"\nllm-compressor on demo:smollm2-moe ({moe.get('architecture', '?')}): "
              + (f"ppl {moe.get('perplexity', float('nan')):.3f} (fp {moe.get('perplexity_fp', float('nan')):.3f}), "
                 f"{moe['quantized_modules']} modules quantized, 3-D params left: {len(moe['unquantized_params_3d'])}"
                 if moe["ok"] else f"failed: {moe['error']}"))


if __name__ == "__main__":
    main()
