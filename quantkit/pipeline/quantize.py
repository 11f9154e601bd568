"""``quantize(src, out, recipe)``: stream a checkpoint layer by layer, quantize per the plan, write.

Peak memory is about one decoder layer (in the compute dtype) plus one quantized tensor: the output
layout is planned up front and each tensor is written straight to its place in its shard.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from quantkit import __version__
from quantkit.errors import UsageError
from quantkit.format import compressed_tensors as fmt
from quantkit.format import fastdeploy, wint2
from quantkit.format import trellis as trellis_fmt
from quantkit.format.writer import CheckpointWriter, TensorSpec
from quantkit.model.loader import FP32_PARAMS, Checkpoint, default_dtype, model_tensors, source_names, stream_layers
from quantkit.calib.capture import EXPERT_CALIBRATION, capture_layer
from quantkit.calib.data import DEFAULT_CALIB, calibration_windows
from quantkit.calib.hidden import HiddenStore
from quantkit.pipeline import resume
from quantkit.pipeline.awq_apply import apply_awq, block_sample
from quantkit.pipeline.finite import NonFiniteError, check_activations, check_source
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
    memory_budget: int = 4_000_000_000  # bytes of hidden states kept in memory; the rest spills to disk

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
    export: str = "quantkit"  # or "fastdeploy": FastDeploy's wint2 checkpoint (quantkit.format.fastdeploy)
    server: str | None = None  # refuse a plan this server could not load (quantkit.serving), before any work
    tp: int = 1  # the tensor-parallel size the server check assumes

    def __post_init__(self):
        from quantkit.serving import SERVERS

        if self.export not in EXPORTS:
            raise UsageError(f"--export must be one of {', '.join(EXPORTS)}, got {self.export!r}")
        if self.server is not None and self.server not in SERVERS:
            raise UsageError(f"--server must be one of {', '.join(SERVERS)}, got {self.server!r}")
        if self.tp < 1:
            raise UsageError(f"--tp must be >= 1, got {self.tp}")


EXPORTS = ("quantkit", "fastdeploy")


def refuse(server: str, reasons: list, tp: int = 1) -> None:
    """A UsageError (one line) when ``server`` could not load the planned output."""
    if reasons:
        more = f"; and {len(reasons) - 1} more reason(s) (--dry-run lists them)" if len(reasons) > 1 else ""
        raise UsageError(f"{server}{f' (tp={tp})' if tp > 1 else ''} could not load this output, nothing was written: "
                         + reasons[0].line() + more)


def entry_specs(entry: PlanEntry, dtype: torch.dtype, spec) -> list[TensorSpec]:
    """On-disk tensors of one planned module (per expert for routed experts), under ``spec``'s (the family's) Hub names."""
    if entry.rule.format == "code2":
        return wint2.module_specs(entry.module, entry.shape, spec)
    if entry.rule.format == "trellis":
        return trellis_fmt.module_specs(entry.module, entry.shape, entry.rule.bits, spec)
    n, k = entry.shape[-2:]
    return [s for prefix in fmt.expert_prefixes(entry.module, entry.shape[0] if entry.is_experts else 0, spec)
            for s in fmt.linear_specs(prefix, n, k, entry.rule.bits, entry.group_size, entry.rule.symmetric, dtype)]


def planned_module(param: str, plan: Plan) -> PlanEntry | None:
    """The plan entry a tensor belongs to: ``...q_proj.weight`` -> ``...q_proj``; 3-D experts by name."""
    module = param[: -len(".weight")] if param.endswith(".weight") else param
    return plan.entry(module)


def output_specs(skeleton, cfg, plan: Plan, dtype: torch.dtype) -> list[TensorSpec]:
    """Every tensor of the output, in checkpoint order, with its dtype and shape (from the config alone)."""
    specs = []
    for name, t in model_tensors(skeleton):
        entry = planned_module(name, plan)
        if entry is not None:
            specs += entry_specs(entry, dtype, cfg.spec)
            continue
        out_dtype = torch.float32 if FP32_PARAMS.search(name) else dtype
        disk = source_names(name, cfg)
        shape = tuple(t.shape[1:]) if len(disk) > 1 else tuple(t.shape)  # e_score_correction_bias keeps the Hub's [1, E]
        specs += [TensorSpec(d, out_dtype, shape) for d in disk]
    return specs


def output_plan(cfg, recipe: Recipe, export: str, skeleton, dtype: torch.dtype) -> tuple[Plan, list[TensorSpec]]:
    """The plan and every output tensor of an export: quantkit's layout, or FastDeploy's
    (``quantkit.format.fastdeploy``, which refuses what FastDeploy cannot express before any work)."""
    if export == "fastdeploy":
        plan = fastdeploy.plan(cfg, recipe)
        return plan, fastdeploy.output_specs(cfg.raw, plan)
    plan = make_plan(cfg, recipe)
    return plan, output_specs(skeleton, cfg, plan, dtype)


def output_config(cfg, plan: Plan, export: str = "quantkit") -> dict:
    """The output's config.json: FastDeploy's for its export; else the source's with the compressed-tensors
    ``quantization_config`` that describes the plan (and the 2-bit code's own block)."""
    if export == "fastdeploy":
        return fastdeploy.config_json(cfg.raw, plan)
    config = dict(cfg.raw)
    config["quantization_config"] = qconfig = fmt.quantization_config(plan, cfg.spec)
    code2_modules = [e.module for e in plan.entries if e.rule.format == "code2"]
    if code2_modules:
        qconfig[wint2.CONFIG_KEY] = wint2.config_block(code2_modules)
    trellis_modules = {e.module: (e.rule.bits, e.rule.state_bits) for e in plan.entries if e.rule.format == "trellis"}
    if trellis_modules:
        qconfig[trellis_fmt.CONFIG_KEY] = trellis_fmt.config_block(trellis_modules)
    return config


def check_servers(cfg, plan: Plan, specs: list[TensorSpec], export: str, servers, tp: int = 1) -> dict:
    """What each server would say of the planned output (``quantkit.serving``), before any work."""
    from quantkit.serving import CheckpointView, check

    view = CheckpointView.from_specs(output_config(cfg, plan, export), specs)
    return {s: check(view, s, tp) for s in servers}


def calibration_hidden(ckpt: Checkpoint, c: CalibOptions, device: str, directory: Path) -> HiddenStore:
    """The calibration windows' embeddings, batch by batch (the first layer's inputs); spills under ``directory``."""
    windows = calibration_windows(c.data, Tokenizer(ckpt.path), c.samples, c.seq_len, c.seed)
    embed = ckpt.read_param("model.embed_tokens.weight", torch.float32).to(device)
    check_source(["model.embed_tokens.weight"], embed)
    store = HiddenStore(directory, c.memory_budget, device)
    for i in range(0, len(windows), c.batch_size):
        store.append(torch.nn.functional.embedding(windows[i:i + c.batch_size].to(device), embed))
    return store


class QuantizeRun:
    """One quantization run, phase by phase: plan, (calibration inputs), globals, layers, finish."""

    def __init__(self, src: str, out: str | Path, recipe: Recipe, options: QuantizeOptions):
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError("--device cuda asked for, but CUDA is not available")
        self.t0 = time.perf_counter()
        self.src, self.recipe, self.opt = src, recipe, options
        self.path = resolve(src)
        self.ckpt = Checkpoint(self.path)
        if self.ckpt.qconfig is not None:
            raise UsageError(f"{src} is already quantized; quantize the original checkpoint")
        self.cfg, self.dtype = self.ckpt.config, default_dtype(self.ckpt.config)
        self.budget = None
        if recipe.bits_per_weight is not None:  # K per routed-expert tensor from a sensitivity pass (before any writing)
            from quantkit.pipeline.budget import apply_budget

            recipe, self.budget = apply_budget(self.ckpt, recipe, options)
            self.recipe = recipe
        self.fd = options.export == "fastdeploy"  # FastDeploy's layout: quantkit.format.fastdeploy owns it
        self.plan, self.specs = output_plan(self.cfg, recipe, options.export, self.ckpt.skeleton, self.dtype)
        if options.server:
            refuse(options.server, check_servers(self.cfg, self.plan, self.specs, options.export, [options.server],
                                                 options.tp)[options.server], options.tp)
        self.scale_dtype = torch.bfloat16 if self.fd else self.dtype
        self.calibrated = any(e.rule.method != "rtn" for e in self.plan.entries)
        self.fp_stream = any(e.rule.fp_target and "gptq" in e.rule.method for e in self.plan.entries)
        self.out = Path(out).expanduser().resolve()
        self.partial = self.out.parent / f".{self.out.name}.partial"
        self.fp = resume.fingerprint(self.path, self.ckpt.reader, {
            "recipe": recipe.to_dict(),
            "calib": {k: v for k, v in options.calib.__dict__.items() if k != "memory_budget"} if self.calibrated else None,
            "device": options.device, "shard": options.max_shard_bytes, "export": options.export})
        self.state = {"fingerprint": self.fp, "layers_done": -1, "written": [], "layers": [],
                      "total_weights": 0, "quantized_weights": 0}
        self.hidden = self.fp_hidden = self.cos = self.sin = None

    # -- phases --------------------------------------------------------------------------------------
    def calibration_inputs(self) -> None:
        self.hidden = calibration_hidden(self.ckpt, self.opt.calib, self.opt.device, self.partial / resume.HIDDEN_DIR)
        if self.fp_stream:  # the same windows through the unquantized model (its own budget and folder)
            self.fp_hidden = HiddenStore(self.partial / resume.FP_HIDDEN_DIR, self.opt.calib.memory_budget, self.opt.device)
            for h in self.hidden:
                self.fp_hidden.append(h.clone())

    def write_plain(self, name: str, t: torch.Tensor) -> None:
        self.state["total_weights"] += t.numel()
        if self.fd:
            for d, part in fastdeploy.plain_tensors(name, t).items():
                self.writer.write(d, part)
            return
        disk = source_names(name, self.cfg)
        for d, part in zip(disk, [t] if len(disk) == 1 else list(t)):
            spec = self.writer.shards.where[d][2]
            self.writer.write(d, part.reshape(spec.shape).to(spec.dtype))

    def write_globals(self) -> None:
        names = ("model.embed_tokens.weight", "model.norm.weight") + (() if self.cfg.tie_word_embeddings else ("lm_head.weight",))
        for name in names:
            t = self.ckpt.read_param(name, self.dtype)
            check_source([name], t)
            self.write_plain(name, t)

    def run_layer(self, idx: int, layer) -> None:
        t0 = time.perf_counter()
        prefix, c = f"model.layers.{idx}", self.opt.calib
        entries = [e for e in self.plan.entries if e.module.startswith(prefix + ".")]
        cap = awq_alphas = None
        for name, t in model_tensors(layer):
            check_source(source_names(f"{prefix}.{name}", self.cfg), t)
        if self.calibrated:
            cap = capture_layer(layer, self.hidden, self.cos, self.sin, expert_calibration=c.expert_calibration,
                                prob_weighted=c.prob_weighted, fp_hidden=self.fp_hidden)
            for key, stat in cap.stats.items():
                check_activations(f"{prefix}.{key}", stat.abs_sum)
            if self.fp_hidden is not None:  # the fp stream's next inputs, through the layer's fp weights; this
                with torch.no_grad():  # generation stays on disk until the layer is done (resume reopens it)
                    fp_next = self.fp_hidden.map(lambda h: layer(h, self.cos, self.sin), drop=False)
            if any("awq" in e.rule.method for e in entries):
                sample = (block_sample(self.hidden), self.cos, self.sin) if any(e.rule.awq_block for e in entries) else None
                awq_alphas = apply_awq(layer, cap, {e.module[len(prefix) + 1:]: e for e in entries}, sample=sample)
        res = quantize_layer(layer, prefix, entries, cap, scale_dtype=self.scale_dtype, min_expert_tokens=c.min_expert_tokens,
                             expert_calibration=c.expert_calibration)
        for name, t in model_tensors(layer):
            full = f"{prefix}.{name}"
            entry = planned_module(full, self.plan)
            if entry is None:
                self.write_plain(full, t)
                continue
            self.state["total_weights"] += t.numel()
            self.state["quantized_weights"] += t.numel()
            rel = entry.module[len(prefix) + 1:]
            if self.fd:
                tensors = fastdeploy.module_tensors(entry.module, res.qtensors, prefix)
            elif entry.rule.format == "code2":
                tensors = wint2.module_tensors(entry.module, res.qtensors[rel], self.cfg.spec)
            elif entry.rule.format == "trellis":
                tensors = trellis_fmt.module_tensors(entry.module, res.qtensors[rel], self.cfg.spec)
            else:
                tensors = fmt.module_tensors(entry.module, res.qtensors[rel], self.cfg.spec)
            for k, v in tensors.items():
                self.writer.write(k, v)
        if self.fp_hidden is not None:
            self.fp_hidden.drop()
            self.fp_hidden = fp_next
        if self.calibrated:
            with torch.no_grad():  # the quantized layer feeds the next
                self.hidden = self.hidden.map(lambda h: self._checked(layer(h, self.cos, self.sin), prefix))
            self.state["layers"].append({
                "layer": idx, "moe": bool(layer.is_moe), "seconds": round(time.perf_counter() - t0, 2), "errors": res.errors, "awq_alpha": awq_alphas, "rtn_fallback_experts": res.rtn_fallback_experts,
                "quantize_seconds": res.seconds,
                "expert_tokens": None if cap.expert_tokens is None else cap.expert_tokens.tolist()})

    @staticmethod
    def _checked(h: torch.Tensor, prefix: str) -> torch.Tensor:
        check_activations(prefix, h, what="output")
        return h

    def checkpoint_progress(self, idx: int) -> None:
        self.state["layers_done"] = idx
        self.state["written"] = sorted(set(self.writer.shards.where) - self.writer.shards.pending)
        self.state["hidden"] = self.hidden.persist() if self.calibrated else None
        self.state["hidden_fp"] = self.fp_hidden.persist() if self.fp_hidden is not None else None
        resume.save_state(self.partial, self.state)

    def finish(self) -> dict:
        w = self.writer
        shards = w.shards.close()
        resume.clear_state(self.partial)
        w.write_json("config.json", output_config(self.cfg, self.plan, self.opt.export))
        copied = w.copy_small_files(self.path)
        plan_rows = [{"module": e.module, "shape": list(e.shape), "rule": e.rule.label, "method": e.rule.method,
                      "group_size": e.group_size, "note": e.note} for e in self.plan.entries]
        w.write_json(fmt.METADATA_FILE, {
            "format": fastdeploy.FORMAT_NAME if self.fd else fmt.FORMAT_NAME, "format_version": fmt.FORMAT_VERSION, "quantkit_version": __version__,
            "recipe": self.plan.recipe.to_dict(), "plan": plan_rows, "unquantized": list(self.plan.unquantized), "shards": shards})
        parts: dict[str, list[int]] = {}  # rule label -> [bytes, weights]
        for e in self.plan.entries:
            acc = parts.setdefault(e.rule.label + (" (routed experts)" if e.is_experts else ""), [0, 0])
            acc[0] += fastdeploy.entry_bytes(e) if self.fd else sum(s.nbytes for s in entry_specs(e, self.dtype, self.cfg.spec))
            acc[1] += math.prod(e.shape)
        quantized_bytes = sum(b for b, _ in parts.values())
        st = self.state
        report = {
            "source": str(self.src), "output": str(self.out), "recipe": self.recipe.name, "device": self.opt.device,
            "seconds": round(time.perf_counter() - self.t0, 2),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "quantized_weights": st["quantized_weights"], "total_weights": st["total_weights"],
            "bits_per_weight_quantized": 8 * quantized_bytes / max(st["quantized_weights"], 1),
            "bits_per_weight_overall": 8 * w.shards.total_bytes / max(st["total_weights"], 1),
            "bits_per_weight_parts": {k: {"bits_per_weight": 8 * b / max(n, 1), "weights": n} for k, (b, n) in sorted(parts.items())},
            "export": self.opt.export,
            "size_bytes": sum((w.tmp / f).stat().st_size for f in shards),
            "source_size_bytes": sum(f.stat().st_size for f in self.path.glob("*.safetensors")),
            "shards": len(shards), "copied_files": copied,
            "fallbacks": [r for r in plan_rows if r["note"]], "unquantized": list(self.plan.unquantized),
            "method": sorted({e.rule.method for e in self.plan.entries}),
            "calibration": None if not self.calibrated else {**self.opt.calib.__dict__,
                                                             "tokens": self.opt.calib.samples * self.opt.calib.seq_len},
            "layers": st["layers"],
            "bit_budget": self.budget,
        }
        w.write_json(REPORT_FILE, report)
        w.commit()
        return report

    # -- the whole run -------------------------------------------------------------------------------
    def run(self, resume_run: bool = False) -> dict:
        try:
            return self._run(resume_run)
        except NonFiniteError:  # no run could ever finish this partial output: leave nothing behind
            shutil.rmtree(self.partial, ignore_errors=True)
            raise

    def _run(self, resume_run: bool) -> dict:
        saved = resume.load_state(self.partial, self.fp) if resume_run else None
        if saved is None and self.partial.exists():
            shutil.rmtree(self.partial)  # a stale partial of another (or an unresumed) run
        with CheckpointWriter(self.out, self.specs, max_shard_bytes=self.opt.max_shard_bytes, force=self.opt.force,
                              metadata={"quantkit_format": fastdeploy.FORMAT_NAME if self.fd else fmt.FORMAT_NAME}, partial=self.partial,
                              reuse=saved is not None) as self.writer:
            if self.calibrated:
                self.cos, self.sin = (t.to(self.opt.device) for t in self.ckpt.skeleton.rope(0, self.opt.calib.seq_len, "cpu"))
            if saved is not None:
                self.state = saved
                self.writer.shards.mark_written(saved["written"])
                if self.calibrated and saved["layers_done"] >= 0:
                    self.hidden = HiddenStore.reopen(self.partial / resume.HIDDEN_DIR, self.opt.calib.memory_budget,
                                                     self.opt.device, saved["hidden"])
                    if saved.get("hidden_fp"):
                        self.fp_hidden = HiddenStore.reopen(self.partial / resume.FP_HIDDEN_DIR,
                                                            self.opt.calib.memory_budget, self.opt.device, saved["hidden_fp"])
            if self.calibrated and self.hidden is None:
                self.calibration_inputs()
            if saved is None:
                self.write_globals()
            start = self.state["layers_done"] + 1
            compute_dtype = torch.float32 if self.calibrated else self.dtype
            with tqdm(total=self.cfg.num_hidden_layers, initial=start, desc="quantize", unit="layer",
                      disable=not self.opt.progress, file=sys.stderr) as bar:  # closed before an error is printed
                for idx, layer in stream_layers(self.ckpt, device=self.opt.device, dtype=compute_dtype, start=start):
                    self.run_layer(idx, layer)
                    self.checkpoint_progress(idx)
                    bar.update(1)
            return self.finish()


def quantize(src: str, out: str | Path, recipe: Recipe, options: QuantizeOptions = QuantizeOptions(),
             resume_run: bool = False) -> dict:
    """Quantize checkpoint ``src`` into ``out`` with ``recipe``; returns the report (also written to OUT).

    The work happens in a hidden ``.OUT.partial`` directory beside OUT, renamed to OUT at the end.
    If the run dies, that directory stays; ``resume_run=True`` continues it (same inputs required).
    """
    return QuantizeRun(src, out, recipe, options).run(resume_run)


def format_summary(r: dict) -> str:
    gb = 1e9
    lines = [
        f"quantized {r['source']} -> {r['output']} with {r['recipe']} in {r['seconds']:.1f}s (peak RSS {r['peak_rss_bytes'] / gb:.2f} GB)",
        f"  bits/weight: {r['bits_per_weight_quantized']:.3f} in the quantized part "
        f"({r['quantized_weights'] / max(r['total_weights'], 1):.1%} of weights), {r['bits_per_weight_overall']:.3f} overall",
        *[f"    {k}: {v['bits_per_weight']:.3f} bits/weight over {v['weights']:,} weights"
          for k, v in r.get("bits_per_weight_parts", {}).items()],
        f"  size: {r['size_bytes'] / gb:.3f} GB on disk vs {r['source_size_bytes'] / gb:.3f} GB source "
        f"({r['size_bytes'] / max(r['source_size_bytes'], 1):.1%}) in {r['shards']} shard(s)",
    ]
    for f in r["fallbacks"][:5]:
        lines.append(f"  note: {f['module']}: {f['note']}")
    if len(r["fallbacks"]) > 5:
        lines.append(f"  note: {len(r['fallbacks']) - 5} more notes (see {REPORT_FILE})")
    return "\n".join(lines)


def load_report(out: Path) -> dict:
    return json.loads((Path(out) / REPORT_FILE).read_text())
