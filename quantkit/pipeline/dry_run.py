"""``quantkit quantize --dry-run``: the plan and what the run will need, from config.json alone (with a bit
budget, ``--bits-per-weight``, also the sensitivity pass that picks K per tensor: weights and calibration).

Estimates (bytes), for the layer-by-layer pipeline:
  peak memory on the compute device = the largest decoder layer in the compute dtype (fp32 when
      calibrating, the model dtype for RTN) + its quantized form + (calibrating) the calibration hidden
      states twice (a layer's inputs and outputs), the layer's Hessians and GPTQ's working set
  peak host memory = the above when computing on the CPU, plus the interpreter and libraries (~0.4 GB);
      with a GPU, host memory holds about one layer as read from disk
  disk = the output + the resumable state (one copy of the hidden states) beside it
"""

from __future__ import annotations

import torch

from quantkit.model.causal_lm import MoeForCausalLM
from quantkit.model.config import MoeConfig
from quantkit.model.loader import default_dtype, model_tensors
from quantkit.model.mla import mla_linears
from quantkit.pipeline.layer_quant import EXPERT_CHUNK
from quantkit.quant.config import Recipe
from quantkit.sources import resolve

BASELINE_HOST_BYTES = 400 << 20


def _nbytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    return t.numel() * torch.empty((), dtype=dtype).element_size()


def dry_run(src: str, recipe: Recipe, options) -> dict:
    from quantkit.pipeline.quantize import check_servers, output_plan
    from quantkit.serving import SERVERS

    path = resolve(src)
    cfg = MoeConfig.from_dir(path)
    budget = None
    if recipe.bits_per_weight is not None:  # the K per tensor needs the weights (and calibration): the sensitivity pass
        from quantkit.model.loader import Checkpoint
        from quantkit.pipeline.budget import apply_budget

        recipe, budget = apply_budget(Checkpoint(path), recipe, options)
    with torch.device("meta"):
        skeleton = MoeForCausalLM(cfg)
    dtype = default_dtype(cfg)
    plan, specs = output_plan(cfg, recipe, options.export, skeleton, dtype)
    servers = check_servers(cfg, plan, specs, options.export, SERVERS, options.tp)
    out_bytes = sum(s.nbytes for s in specs)
    src_bytes = sum(_nbytes(t, torch.float32 if t.dtype == torch.float32 and "gate.weight" in n else dtype)
                    for n, t in model_tensors(skeleton))
    calibrated = any(e.rule.method != "rtn" for e in plan.entries)
    compute = torch.float32 if calibrated else dtype
    layers = skeleton.model.layers
    layer_bytes = max(sum(_nbytes(t, compute) for _, t in model_tensors(l)) for l in layers)
    quant_layer = max(sum(s.nbytes for s in specs if s.name.split(".", 1)[-1].startswith(f"layers.{i}.")) for i in range(len(layers)))
    hidden = hessians = gptq_ws = 0
    if calibrated:
        c = options.calib
        hidden = 2 * c.samples * c.seq_len * cfg.hidden_size * 4
        H, D = cfg.hidden_size, cfg.head_dim
        attn = 4 * (H * H + (cfg.num_attention_heads * D) ** 2)
        attn_k = H
        if cfg.spec.attention == "mla":  # one Hessian per input: h (q_a/q + kv_a), q_lora, kv_lora, heads * v
            ks = [k for n, (_, k) in mla_linears(cfg.mla) if n != "kv_a_proj_with_mqa"]
            attn, attn_k = 4 * sum(k * k for k in ks), max(ks)
        moe = 0
        if cfg.moe_layers:
            E, I, S = cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.shared_width
            moe = 4 * (E * (H * H + I * I) + (H * H + S * S if S else 0))
        dense = 4 * (H * H + cfg.intermediate_size ** 2) if len(cfg.moe_layers) < cfg.num_hidden_layers else 0
        hessians = attn + max(moe, dense)
        # H, its Cholesky factor and a clone, fp32: one matrix at a time for linears, EXPERT_CHUNK for experts
        k_dense = max(attn_k, cfg.intermediate_size if dense else H, cfg.shared_width)
        k_expert = max(H, cfg.moe_intermediate_size) if cfg.moe_layers else 0
        gptq_ws = 3 * 4 * max(k_dense * k_dense, EXPERT_CHUNK * k_expert * k_expert)
    device_peak = layer_bytes + quant_layer + hidden + hessians + gptq_ws
    on_cpu = not options.device.startswith("cuda")
    return {
        "source": src, "recipe": recipe.name, "method": sorted({e.rule.method for e in plan.entries}),
        "device": options.device,
        "plan": [{"module": e.module, "shape": list(e.shape), "rule": e.rule.label, "group_size": e.group_size, "note": e.note}
                 for e in plan.entries],
        "unquantized": list(plan.unquantized),
        "source_bytes": src_bytes, "output_bytes": out_bytes,
        "peak_host_bytes": (device_peak if on_cpu else layer_bytes) + BASELINE_HOST_BYTES,
        "peak_gpu_bytes": None if on_cpu else device_peak,
        "disk_bytes": out_bytes + hidden // 2,
        "servers": {s: [r.line() for r in reasons] for s, reasons in servers.items()}, "tp": options.tp,
        "bit_budget": budget,
        "breakdown": {"largest_layer": layer_bytes, "quantized_layer": quant_layer, "hidden_states": hidden,
                      "hessians": hessians, "gptq_working_set": gptq_ws},
    }


def format_dry_run(r: dict, max_rows: int = 12) -> str:
    gb = lambda b: f"{b / 1e9:.2f} GB"
    from collections import Counter

    rules = Counter((p["rule"], p["group_size"]) for p in r["plan"])
    lines = [f"dry run: {r['source']} with {r['recipe']} ({'+'.join(r['method'])}) on {r['device']}",
             f"  plan: {len(r['plan'])} modules quantized, {len(r['unquantized'])} left unquantized by the recipe"]
    lines += [f"    {rule} (effective group {g}): {n} modules" for (rule, g), n in sorted(rules.items())]
    notes = [p for p in r["plan"] if p["note"]]
    for p in notes[:max_rows]:
        lines.append(f"    note: {p['module']}: {p['note']}")
    if len(notes) > max_rows:
        lines.append(f"    note: {len(notes) - max_rows} more notes")
    if r.get("bit_budget"):
        from quantkit.pipeline.budget import format_budget

        lines += format_budget(r["bit_budget"])
    b = r["breakdown"]
    lines += [f"  output size: {gb(r['output_bytes'])} (source {gb(r['source_bytes'])})",
              f"  disk needed: {gb(r['disk_bytes'])}",
              f"  peak host memory: ~{gb(r['peak_host_bytes'])}" + (f", peak GPU memory: ~{gb(r['peak_gpu_bytes'])}" if r["peak_gpu_bytes"] else ""),
              f"    (largest layer {gb(b['largest_layer'])}, its quantized form {gb(b['quantized_layer'])}, "
              f"hidden states {gb(b['hidden_states'])}, Hessians {gb(b['hessians'])}, GPTQ working set {gb(b['gptq_working_set'])})"]
    lines.append("  servers that could load the output" + (f" (tp={r['tp']})" if r["tp"] > 1 else "") + ":")
    for server, reasons in r["servers"].items():
        lines += [f"    {server}: yes"] if not reasons else [f"    {server}: no: {why}" for why in reasons]
    return "\n".join(lines)
