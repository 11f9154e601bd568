"""vLLM's loader rules for ERNIE-4.5-MoE checkpoints (compressed-tensors weight-only int, "WNA16").

Read from vllm-project/vllm main (2026; the split ``compressed_tensors_moe/`` package), function by function
in ``shared/research/interop-audit.md``; nothing here runs vLLM. vLLM builds ERNIE with q/k/v fused into
``qkv_proj`` and gate/up into ``gate_up_proj`` (dense MLP and shared experts), the routed experts of a layer as
one ``FusedMoE`` (``w13`` = gate|up, ``w2`` = down), the router ``mlp.gate`` unquantized
(``models/ernie45_moe.py``). For every such layer it asks the ``quantization_config`` for a scheme:
ignored (``compressed_tensors/utils.py::should_ignore_layer``, every shard of a fused layer alike) or the
first matching target (``find_matched_target``: ``re:`` regexes by ``re.match`` on the module name, else the
exact name, else a class name such as ``Linear``), and a layer that matches neither is a ValueError.
"""

from __future__ import annotations

import re

from quantkit.errors import QuantkitError
from quantkit.format import trellis, wint2
from quantkit.serving import CheckpointView, Reason

VERSIONS = "rules read from vLLM main, 2026 (compressed-tensors WNA16 + WNA16 MoE)"
SERVE = "vllm serve {path} --tensor-parallel-size {tp}"
ARCHITECTURES = ("Ernie4_5_MoeForCausalLM",)  # vllm/model_executor/models/registry.py
# quantkit's own expert codes, by a leaf only they write: what vLLM has no reader for
QUANTKIT_CODES = {wint2.QUANT_WEIGHT: "2-bit code (CCQ/WINT2)", trellis.TRELLIS: "trellis code"}
WNA16_BITS = (4, 8)  # compressed_tensors/schemes/compressed_tensors_wNa16.py::WNA16_SUPPORTED_BITS
CT = "vllm/model_executor/layers/quantization/compressed_tensors/"
SRC = {
    "arch": "vllm/model_executor/models/registry.py (_TEXT_GENERATION_MODELS)",
    "method": "vllm/model_executor/model_loader/weight_utils.py::get_quant_config",
    "bits": CT + "schemes/compressed_tensors_wNa16.py::WNA16_SUPPORTED_BITS; compressed_tensors.py::_get_scheme_from_parts",
    "format": CT + "compressed_tensors.py::_get_scheme_from_parts (WNA16 needs format pack-quantized)",
    "target": CT + "utils.py::find_matched_target",
    "fused": CT + "utils.py::should_ignore_layer / _match_fused_layer",
    "moe_same": CT + "compressed_tensors_moe/compressed_tensors_moe.py::get_moe_method",
    "moe_sym": CT + "compressed_tensors_moe/compressed_tensors_moe_wna16_marlin.py::__init__ (symmetric assert; lifted by vllm#44025)",
    "code2": "vllm/model_executor/models/ernie45_moe.py::load_weights (an ignored FusedMoE is UnquantizedFusedMoEMethod)",
    "tensors": CT + "schemes/compressed_tensors_wNa16.py::create_weights",
    "heads": "vllm/config/model.py::ModelConfig.verify_with_parallel_config",
    "tp_group": CT + "schemes/compressed_tensors_wNa16.py::create_weights (scales: input_size_per_partition // group_size)",
    "moe_tp_group": "vllm/model_executor/layers/quantization/utils/marlin_utils.py::check_moe_marlin_supports_layer; "
                    + CT + "compressed_tensors_moe/compressed_tensors_moe_wna16.py::create_weights",
}


def _match(name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    return pattern == name or pattern.lower() == "linear"  # a class target: every linear shard is a Linear


def scheme(qconfig: dict, shard: str):
    """vLLM's answer for one on-disk linear: "ignored", the ``weights`` args of the first matching group, or
    None (no target: a ValueError in vLLM)."""
    if any(_match(shard, p) for p in qconfig.get("ignore") or [] if p.lower() != "linear"):
        return "ignored"
    for group in (qconfig.get("config_groups") or {}).values():
        if any(_match(shard, t) for t in group.get("targets") or []):
            return {**(group.get("weights") or {}), "format": group.get("format") or qconfig.get("format")}
    return None


def vllm_layers(cfg) -> list[tuple[str, str, list[str], int | None]]:
    """(vLLM layer name, kind, on-disk shard prefixes, K per TP rank divisor dim) for every quantizable layer.
    kind: "column" (split along N), "row" (split along K) or "moe"."""
    out = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.qkv_proj", "column", [f"{p}.self_attn.{x}_proj" for x in "qkv"], cfg.hidden_size),
                (f"{p}.self_attn.o_proj", "row", [f"{p}.self_attn.o_proj"], cfg.num_attention_heads * cfg.head_dim)]
        mlps = []
        if cfg.is_moe_layer(i):
            if cfg.shared_width:
                mlps.append((f"{p}.mlp.shared_experts", cfg.shared_width))
            experts = [f"{p}.mlp.experts.{e}.{x}_proj" for e in range(cfg.moe_num_experts) for x in ("gate", "up", "down")]
            out.append((f"{p}.mlp.experts", "moe", experts, cfg.moe_intermediate_size))
        else:
            mlps.append((f"{p}.mlp", cfg.intermediate_size))
        for m, width in mlps:
            out += [(f"{m}.gate_up_proj", "column", [f"{m}.gate_proj", f"{m}.up_proj"], cfg.hidden_size),
                    (f"{m}.down_proj", "row", [f"{m}.down_proj"], width)]
    return out


def _key(w: dict) -> tuple:
    return (w.get("num_bits"), w.get("type", "int"), bool(w.get("symmetric", True)), w.get("strategy"),
            w.get("group_size"), w.get("actorder"), w.get("format"))


def check(view: CheckpointView, tp: int = 1) -> list[Reason]:
    from quantkit.model.config import MoeConfig

    archs = view.config.get("architectures") or []
    if not any(a in ARCHITECTURES for a in archs):
        return [Reason("architecture", "config.json architectures", f"{archs or 'none'}: vLLM's ERNIE-4.5-MoE is "
                       f"{ARCHITECTURES[0]}", SRC["arch"])]
    try:
        cfg = MoeConfig.from_dict(view.config)
    except QuantkitError as e:
        return [Reason("config", "config.json", str(e), SRC["arch"])]
    reasons = _tp_heads(cfg, tp)
    q = view.qconfig
    if q is not None and q.get("quant_method") != "compressed-tensors":
        return reasons + [Reason("quantization method", "config.json quantization_config.quant_method",
                                 f"{q.get('quant_method')!r}: these rules cover compressed-tensors only; a config without "
                                 "quant_method is not a vLLM quantization config", SRC["method"])]
    for layer, kind, shards, k_split in vllm_layers(cfg):
        schemes = [scheme(q, s) if q is not None else "ignored" for s in shards]
        reasons += _layer(view, layer, kind, shards, schemes, k_split, tp)
    return reasons


def _tp_heads(cfg, tp: int) -> list[Reason]:
    out = []
    if cfg.num_attention_heads % tp:
        out.append(Reason("tensor parallelism", "num_attention_heads", f"{cfg.num_attention_heads} heads are not "
                          f"divisible by tp={tp}", SRC["heads"]))
    kv = cfg.num_key_value_heads
    if (kv >= tp and kv % tp) or (kv < tp and tp % kv):
        out.append(Reason("tensor parallelism", "num_key_value_heads", f"{kv} KV heads cannot be split or replicated "
                          f"evenly over tp={tp}", "vllm/model_executor/layers/linear.py::QKVParallelLinear"))
    return out


def _layer(view, layer, kind, shards, schemes, k_split, tp) -> list[Reason]:
    fused_up_gate = kind == "moe" and any(n.startswith(layer + ".") and ".up_gate_proj." in n for n in view.tensors)
    for leaf, code in QUANTKIT_CODES.items():
        if fused_up_gate or any(f"{s}.{leaf}" in view.tensors for s in shards):
            return [Reason(f"{code} experts", layer, f"vLLM has no reader for the {code}: the ignored FusedMoE expects "
                           "bf16 experts.{e}.*.weight", SRC["code2"])]
    missing = [s for s, sc in zip(shards, schemes) if sc is None]
    if missing:
        return [Reason("no matching target", missing[0], "a linear that is neither ignored nor matched by a config "
                       "group target raises ValueError", SRC["target"])]
    kinds = {"ignored" if sc == "ignored" else _key(sc) for sc in schemes}
    if len(kinds) > 1:
        what = "MoE projections with different schemes" if kind == "moe" else "fused shards with different schemes"
        rule = ("All MoE projections need to have same quantization scheme" if kind == "moe" else
                "vLLM loads these shards as one fused layer: all must share one scheme (or all be ignored)")
        return [Reason(what, layer, rule, SRC["moe_same" if kind == "moe" else "fused"])]
    sc = schemes[0]
    if sc == "ignored":
        absent = [s for s in shards if f"{s}.weight" not in view.tensors]
        return [Reason("unquantized layer without weights", absent[0], "an ignored layer is loaded unquantized from "
                       "its .weight tensor", SRC["code2" if kind == "moe" else "tensors"])] if absent else []
    return _quantized(view, layer, kind, shards, sc, k_split, tp)


def _quantized(view, layer, kind, shards, w, k_split, tp) -> list[Reason]:
    out = []
    bits, sym = w.get("num_bits"), bool(w.get("symmetric", True))
    if w.get("type", "int") != "int" or bits not in WNA16_BITS:
        out.append(Reason(f"{bits}-bit {w.get('type', 'int')} weights", layer, f"compressed-tensors WNA16 supports "
                          f"{'/'.join(map(str, WNA16_BITS))}-bit int only", SRC["bits"]))
    if w.get("format") != "pack-quantized":
        out.append(Reason(f"format {w.get('format')!r}", layer, "weight-only int needs pack-quantized", SRC["format"]))
    if kind == "moe" and not sym:
        out.append(Reason("asymmetric MoE experts", layer, "\"Only symmetric quantization is supported for MoE\" "
                          "(vLLM <= 0.19; lifted by vllm#44025, 2026)", SRC["moe_sym"]))
    leaves = ["weight_packed", "weight_scale", "weight_shape"] + ([] if sym else ["weight_zero_point"])
    for s in shards:
        gone = [leaf for leaf in leaves if f"{s}.{leaf}" not in view.tensors]
        if gone:
            out.append(Reason("missing quantized tensor", f"{s}.{gone[0]}", "WNA16 loads weight_packed, weight_scale, "
                              "weight_shape (and weight_zero_point when asymmetric)", SRC["tensors"]))
            return out
    g = w.get("group_size") if w.get("strategy") == "group" else None
    if kind == "moe" and w.get("actorder") in ("group", "dynamic") and not _marlin_moe(view.config, k_split // tp, g):
        out.append(Reason("activation order without Marlin", layer, "Marlin MoE cannot take this layer (hidden % 128, "
                          "I per rank % max(64, g), g in -1/32/64/128) and its WNA16 fallback raises \"WNA16MoE is not "
                          "supported with actorder=group/dynamic\"", SRC["moe_tp_group"]))
    if g and tp > 1 and kind in ("row", "moe") and (k_split // tp) % g:
        out.append(Reason("group straddles a tensor-parallel shard", layer, f"K per rank {k_split}/{tp} = "
                          f"{k_split / tp:g} is not a multiple of group {g}", SRC["moe_tp_group" if kind == "moe" else "tp_group"]))
    return out


def _marlin_moe(config: dict, i_per_rank: int, group: int | None) -> bool:
    """``check_moe_marlin_supports_layer``: otherwise vLLM falls back to its Triton WNA16 MoE (slower, and
    refusing activation order)."""
    g = group or -1
    return config["hidden_size"] % 128 == 0 and i_per_rank % max(64, g) == 0 and g in (-1, 32, 64, 128)
