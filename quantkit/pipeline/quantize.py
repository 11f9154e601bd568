"""``quantize(src, out, recipe)``: stream a checkpoint layer by layer, quantize per the plan, write.

Peak memory is about one decoder layer (in the compute dtype) plus one quantized tensor: the output
layout is planned up front and each tensor is written straight to its place in its shard.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quantkit import __version__
from quantkit.errors import UsageError
from quantkit.format import compressed_tensors as fmt
from quantkit.format.writer import CheckpointWriter, TensorSpec
from quantkit.model.loader import FP32_PARAMS, Checkpoint, default_dtype, model_tensors, source_names, stream_layers
from quantkit.calib.capture import EXPERT_CALIBRATION, capture_layer
from quantkit.calib.data import DEFAULT_CALIB, calibration_windows
from quantkit.pipeline.awq_apply import apply_awq
from quantkit.pipeline.layer_quant import quantize_layer
from quantkit.quant.config import Plan, PlanEntry, Recipe, make_plan
from quantkit.sources import resolve
from quantkit.tokenizer import Tokenizer

REPORT_FILE = "quantize_report.json"


@dataclass(frozen=True)
class CalibOptions:
    data: str = DEFAULT_CALIB
    samples: int = 128
    seq_len: int = 2048
    seed: int = 0
    batch_size: int = 4  # windows per forward call
    expert_calibration: str = "routed"  # or "all"
    prob_weighted: bool = False
    min_expert_tokens: int = 8

    def __post_init__(self):
        if self.expert_calibration not in EXPERT_CALIBRATION:
            raise UsageError(f"--expert-calibration must be one of {', '.join(EXPERT_CALIBRATION)}")
        if self.min_expert_tokens < 0 or self.batch_size < 1:
            raise UsageError("--min-expert-tokens must be >= 0 and the batch size >= 1")


@dataclass(frozen=True)
class QuantizeOptions:
    device: str = "cpu"
    max_shard_bytes: int = 4_000_000_000
    force: bool = False
    progress: bool = True
    calib: CalibOptions = CalibOptions()


def planned_module(param: str, plan: Plan) -> PlanEntry | None:
    """The plan entry a tensor belongs to: ``...q_proj.weight`` -> ``...q_proj``; 3-D experts by name."""
    module = param[: -len(".weight")] if param.endswith(".weight") else param
    return plan.entry(module)


def output_specs(ckpt: Checkpoint, plan: Plan, dtype: torch.dtype) -> list[TensorSpec]:
    """Every tensor of the output, in checkpoint order, with its dtype and shape."""
    specs = []
    for name, t in model_tensors(ckpt.skeleton):
        entry = planned_module(name, plan)
        if entry is not None:
            n, k = entry.shape[-2:]
            for prefix in fmt.expert_prefixes(entry.module, entry.shape[0] if entry.is_experts else 0):
                specs += fmt.linear_specs(prefix, n, k, entry.rule.bits, entry.group_size, entry.rule.symmetric, dtype)
            continue
        out_dtype = torch.float32 if FP32_PARAMS.search(name) else dtype
        disk = source_names(name, ckpt.config)
        shape = tuple(t.shape[1:]) if len(disk) > 1 else tuple(t.shape)
        if name.endswith("e_score_correction_bias"):
            shape = tuple(ckpt.reader.info(disk[0]).shape)  # keep the Hub's [1, E]
        specs += [TensorSpec(d, out_dtype, shape) for d in disk]
    return specs


def quantize(src: str, out: str | Path, recipe: Recipe, options: QuantizeOptions = QuantizeOptions()) -> dict:
    """Quantize checkpoint ``src`` into ``out`` with ``recipe``; returns the report (also written to OUT)."""
    t0 = time.perf_counter()
    if options.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but CUDA is not available")
    path = resolve(src)
    ckpt = Checkpoint(path)
    if ckpt.qconfig is not None:
        raise UsageError(f"{src} is already quantized; quantize the original checkpoint")
    cfg, dtype = ckpt.config, default_dtype(ckpt.config)
    plan = make_plan(cfg, recipe)
    specs = output_specs(ckpt, plan, dtype)
    stats = {"quantized_weights": 0, "quantized_bytes": 0, "total_weights": 0}
    quantized_names = {s.name for e in plan.entries for p in fmt.expert_prefixes(e.module, e.shape[0] if e.is_experts else 0)
                       for s in fmt.linear_specs(p, *e.shape[-2:], e.rule.bits, e.group_size, e.rule.symmetric, dtype)}
    stats["quantized_bytes"] = sum(s.nbytes for s in specs if s.name in quantized_names)

    calibrated = any(e.rule.method != "rtn" for e in plan.entries)
    copt = options.calib
    hidden = cos = sin = None
    if calibrated:
        windows = calibration_windows(copt.data, Tokenizer(path), copt.samples, copt.seq_len, copt.seed)
        embed = ckpt.read_param("model.embed_tokens.weight", torch.float32).to(options.device)
        hidden = [torch.nn.functional.embedding(windows[i:i + copt.batch_size].to(options.device), embed)
                  for i in range(0, len(windows), copt.batch_size)]
        del embed
        cos, sin = ckpt.skeleton.rope(0, copt.seq_len, "cpu")
        cos, sin = cos.to(options.device), sin.to(options.device)
    layer_reports = []

    with CheckpointWriter(out, specs, max_shard_bytes=options.max_shard_bytes, force=options.force,
                          metadata={"quantkit_format": fmt.FORMAT_NAME}) as writer:
        def write_plain(name: str, t: torch.Tensor) -> None:
            stats["total_weights"] += t.numel()
            disk = source_names(name, cfg)
            parts = [t] if len(disk) == 1 else list(t)
            for d, part in zip(disk, parts):
                spec = writer.shards.where[d][2]
                writer.write(d, part.reshape(spec.shape).to(spec.dtype))

        for name in ("model.embed_tokens.weight", "model.norm.weight") + (() if cfg.tie_word_embeddings else ("lm_head.weight",)):
            write_plain(name, ckpt.read_param(name, dtype))
        bar = tqdm(total=cfg.num_hidden_layers, desc="quantize", unit="layer", disable=not options.progress, file=sys.stderr)
        compute_dtype = torch.float32 if calibrated else dtype
        for idx, layer in stream_layers(ckpt, device=options.device, dtype=compute_dtype):
            prefix = f"model.layers.{idx}"
            entries = [e for e in plan.entries if e.module.startswith(prefix + ".")]
            cap, awq_alphas = None, None
            if calibrated:
                cap = capture_layer(layer, hidden, cos, sin, expert_calibration=copt.expert_calibration,
                                    prob_weighted=copt.prob_weighted)
                if any("awq" in e.rule.method for e in entries):
                    awq_alphas = apply_awq(layer, cap, {e.module[len(prefix) + 1:]: e for e in entries})
            res = quantize_layer(layer, prefix, entries, cap, scale_dtype=dtype, min_expert_tokens=copt.min_expert_tokens,
                                 expert_calibration=copt.expert_calibration)
            for name, t in model_tensors(layer):
                full = f"{prefix}.{name}"
                entry = planned_module(full, plan)
                if entry is None:
                    write_plain(full, t)
                    continue
                stats["total_weights"] += t.numel()
                stats["quantized_weights"] += t.numel()
                for k, v in fmt.module_tensors(entry.module, res.qtensors[entry.module[len(prefix) + 1:]]).items():
                    writer.write(k, v)
            if calibrated:
                with torch.no_grad():
                    hidden = [layer(h, cos, sin) for h in hidden]  # the quantized layer feeds the next
                layer_reports.append({"layer": idx, "errors": res.errors, "awq_alpha": awq_alphas, "rtn_fallback_experts": res.rtn_fallback_experts,
                                      "expert_tokens": None if cap.expert_tokens is None else cap.expert_tokens.tolist()})
            bar.update(1)
        bar.close()

        shards = writer.shards.close()
        config = dict(cfg.raw)
        config["quantization_config"] = fmt.quantization_config(plan)
        writer.write_json("config.json", config)
        copied = writer.copy_small_files(path)
        plan_rows = [{"module": e.module, "shape": list(e.shape), "rule": e.rule.label, "method": e.rule.method,
                      "group_size": e.group_size, "note": e.note} for e in plan.entries]
        writer.write_json(fmt.METADATA_FILE, {
            "format": fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "quantkit_version": __version__,
            "recipe": recipe.to_dict(), "plan": plan_rows, "unquantized": list(plan.unquantized), "shards": shards})
        size = sum((writer.tmp / f).stat().st_size for f in shards)
        src_size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        report = {
            "source": str(src), "output": str(writer.out), "recipe": recipe.name, "device": options.device,
            "seconds": round(time.perf_counter() - t0, 2),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "quantized_weights": stats["quantized_weights"], "total_weights": stats["total_weights"],
            "bits_per_weight_quantized": 8 * stats["quantized_bytes"] / max(stats["quantized_weights"], 1),
            "bits_per_weight_overall": 8 * writer.shards.total_bytes / max(stats["total_weights"], 1),
            "size_bytes": size, "source_size_bytes": src_size, "shards": len(shards), "copied_files": copied,
            "fallbacks": [r for r in plan_rows if r["note"]], "unquantized": list(plan.unquantized),
            "method": sorted({e.rule.method for e in plan.entries}),
            "calibration": None if not calibrated else {**copt.__dict__, "tokens": copt.samples * copt.seq_len},
            "layers": layer_reports,
        }
        writer.write_json(REPORT_FILE, report)
        writer.commit()
    return report


def format_summary(r: dict) -> str:
    gb = 1e9
    lines = [
        f"quantized {r['source']} -> {r['output']} with {r['recipe']} in {r['seconds']:.1f}s (peak RSS {r['peak_rss_bytes'] / gb:.2f} GB)",
        f"  bits/weight: {r['bits_per_weight_quantized']:.3f} in the quantized part "
        f"({r['quantized_weights'] / max(r['total_weights'], 1):.1%} of weights), {r['bits_per_weight_overall']:.3f} overall",
        f"  size: {r['size_bytes'] / gb:.3f} GB on disk vs {r['source_size_bytes'] / gb:.3f} GB source "
        f"({r['size_bytes'] / max(r['source_size_bytes'], 1):.1%}) in {r['shards']} shard(s)",
    ]
    for f in r["fallbacks"][:5]:
        lines.append(f"  note: {f['module']}: {f['note']}")
    if len(r["fallbacks"]) > 5:
        lines.append(f"  note: {len(r['fallbacks']) - 5} more group-size fallbacks (see {REPORT_FILE})")
    return "\n".join(lines)


def load_report(out: Path) -> dict:
    return json.loads((Path(out) / REPORT_FILE).read_text())
