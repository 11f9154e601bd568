"""vLLM's loader rules for quantkit's MoE families (compressed-tensors weight-only int, "WNA16").

Read from vllm-project/vllm main (2025-2026; the split ``compressed_tensors_moe/`` package), function by function
in ``shared/research/interop-audit.md`` (ERNIE) and the per-family loader notes cited in ``FAMILIES`` below;
nothing here runs vLLM. vLLM builds every family with q/k/v fused into ``qkv_proj`` (DeepSeek's MLA: ``q_a_proj``
and ``kv_a_proj_with_mqa`` into ``fused_qkv_a_proj``) and gate/up into ``gate_up_proj`` (dense MLP and shared
experts), the routed experts of a layer as one ``FusedMoE`` (``w13`` = gate|up, ``w2`` = down), the router
unquantized. For every such layer it asks the ``quantization_config`` for a scheme: ignored
(``compressed_tensors/utils.py::should_ignore_layer``, every shard of a fused layer alike) or the first matching
target (``find_matched_target``: ``re:`` regexes by ``re.match`` on the module name, else the exact name, else a
class name such as ``Linear``), and a layer that matches neither is a ValueError. A ``FusedMoE`` asks for the names
``{prefix}.experts.0.gate_proj/up_proj/down_proj`` whatever the checkpoint calls them
(``compressed_tensors_moe.py::get_moe_method``).
"""

from __future__ import annotations

import re

from quantkit.errors import QuantkitError
from quantkit.format import trellis, wint2
from quantkit.serving import CheckpointView, Reason

VERSIONS = "rules read from vLLM main, 2026 (compressed-tensors WNA16 + WNA16 MoE)"
SERVE = "vllm serve {path} --tensor-parallel-size {tp}"
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

M = "vllm/model_executor/models/"
# Per family: the architectures vLLM registers, the file its loader facts were read from, and its quirks.
FAMILIES = {
    "ernie": {"architectures": ("Ernie4_5_MoeForCausalLM",), "experts_ge_tp": True,
              "source": M + "ernie45_moe.py::Ernie4_5_MoeMoE.__init__"},
    "qwen3_moe": {"architectures": ("Qwen3MoeForCausalLM",), "experts_ge_tp": True, "router_has_quant_config": True,
                  "source": M + "qwen3_moe.py::Qwen3MoeSparseMoeBlock.__init__ (2026: gate ReplicatedLinear with quant_config)"},
    "qwen2_moe": {"architectures": ("Qwen2MoeForCausalLM",), "experts_ge_tp": True,
                  "source": M + "qwen2_moe.py::Qwen2MoeSparseMoeBlock.__init__ (gate and shared_expert_gate unquantized)"},
    "mixtral": {"architectures": ("MixtralForCausalLM",),
                "source": M + "mixtral.py::MixtralMoE.__init__ (block_sparse_moe.gate unquantized)"},
    "olmoe": {"architectures": ("OlmoeForCausalLM",), "unprefixed_attention": True,
              "source": M + "olmoe.py::OlmoeMoE.__init__ / OlmoeAttention.__init__ (qkv_proj, o_proj built without prefix)"},
    "glm4_moe": {"architectures": ("Glm4MoeForCausalLM",),
                 "source": M + "glm4_moe.py::Glm4MoE.__init__ (gate a plain fp32 nn.Linear)"},
    "deepseek_v3": {"architectures": ("DeepseekV3ForCausalLM",),
                    "source": M + "deepseek_v2.py::DeepseekV2MoE.__init__ (DeepSeekV2Gate asserts quant_config is None)"},
    "deepseek_v2": {"architectures": ("DeepseekV2ForCausalLM",),
                    "source": M + "deepseek_v2.py::DeepseekV2MoE.__init__ (DeepSeekV2Gate asserts quant_config is None)"},
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
    groups = list((qconfig.get("config_groups") or {}).values())
    # find_matched_target: exact names and regexes first, then class names
    for exact in (True, False):
        for group in groups:
            if any(_match(shard, t) for t in group.get("targets") or [] if (t.lower() != "linear") == exact):
                return {**(group.get("weights") or {}), "format": group.get("format") or qconfig.get("format")}
    return None


def vllm_layers(cfg, fam) -> list[tuple[str, str, list[str], list[str], int | None]]:
    """(vLLM layer name, kind, on-disk shard prefixes, names vLLM looks the scheme up by, K per TP rank divisor dim)
    for every quantizable layer. kind: "column" (split along N), "row" (split along K), "replicated" or "moe"."""
    from quantkit.model.arch.spec import hub_path, hub_prefixes

    spec, out = cfg.spec, []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out += _attention_layers(cfg, fam, p)
        mlps = []
        if cfg.is_moe_layer(i):
            if cfg.shared_width:
                mlps.append((f"{p}.{hub_path(spec, 'mlp.shared_experts')}", cfg.shared_width))
            experts = [s for x in ("gate", "up", "down")
                       for s in hub_prefixes(spec, f"{p}.mlp.experts.{x}_proj", cfg.moe_num_experts)]
            moe = hub_prefixes(spec, f"{p}.mlp.experts.gate_proj", 1)[0].rsplit(".", 2)[0]  # ....experts
            out.append((moe, "moe", experts, [f"{moe}.0.{x}_proj" for x in ("gate", "up", "down")],
                        cfg.moe_intermediate_size))
        else:
            mlps.append((f"{p}.mlp", cfg.intermediate_size))
        for m, width in mlps:
            shards = [f"{m}.gate_proj", f"{m}.up_proj"]
            out += [(f"{m}.gate_up_proj", "column", shards, shards, cfg.hidden_size),
                    (f"{m}.down_proj", "row", [f"{m}.down_proj"], [f"{m}.down_proj"], width)]
    return out


def _attention_layers(cfg, fam, p: str) -> list[tuple]:
    a = f"{p}.self_attn"
    if cfg.spec.attention == "mla":  # DeepseekV2MLAAttention (deepseek_v2.py): the a-projections are replicated
        mla = cfg.mla
        heads_v = mla.num_heads * mla.v_head_dim
        if mla.q_lora_rank is not None:
            shards = [f"{a}.q_a_proj", f"{a}.kv_a_proj_with_mqa"]
            first = [(f"{a}.fused_qkv_a_proj", "replicated", shards, shards, None),
                     (f"{a}.q_b_proj", "column", [f"{a}.q_b_proj"], [f"{a}.q_b_proj"], None)]
        else:
            first = [(f"{a}.q_proj", "column", [f"{a}.q_proj"], [f"{a}.q_proj"], None),
                     (f"{a}.kv_a_proj_with_mqa", "replicated", [f"{a}.kv_a_proj_with_mqa"],
                      [f"{a}.kv_a_proj_with_mqa"], None)]
        return first + [(f"{a}.kv_b_proj", "column", [f"{a}.kv_b_proj"], [f"{a}.kv_b_proj"], None),
                        (f"{a}.o_proj", "row", [f"{a}.o_proj"], [f"{a}.o_proj"], heads_v)]
    qkv = [f"{a}.{x}_proj" for x in "qkv"]
    # OLMoE (olmoe.py @e9b0f07) builds qkv_proj / o_proj without a prefix: compressed-tensors sees the name ""
    look_qkv, look_o = ([""] * 3, [""]) if fam.get("unprefixed_attention") else (qkv, [f"{a}.o_proj"])
    return [(f"{a}.qkv_proj", "column", qkv, look_qkv, cfg.hidden_size),
            (f"{a}.o_proj", "row", [f"{a}.o_proj"], look_o, cfg.num_attention_heads * cfg.head_dim)]


def unquantized_layers(cfg, fam) -> list[tuple[str, bool]]:
    """(on-disk prefix, built with the quant config) of the linears vLLM loads unquantized: the router (and
    Qwen2-MoE's shared_expert_gate). One built with the quant config must be matched by an ``ignore`` entry."""
    from quantkit.model.arch.spec import hub_path

    out = []
    for i in cfg.moe_layers:
        p = f"model.layers.{i}"
        out.append((f"{p}.{hub_path(cfg.spec, 'mlp.gate')}", fam.get("router_has_quant_config", False)))
        out += [(f"{p}.{hub_path(cfg.spec, m)}", False) for m in cfg.spec.never_quantized]
    return out


def _key(w: dict) -> tuple:
    return (w.get("num_bits"), w.get("type", "int"), bool(w.get("symmetric", True)), w.get("strategy"),
            w.get("group_size"), w.get("actorder"), w.get("format"))


def check(view: CheckpointView, tp: int = 1) -> list[Reason]:
    from quantkit.model.arch import spec_for_config
    from quantkit.model.config import MoeConfig

    archs = view.config.get("architectures") or []
    try:
        spec = spec_for_config(view.config)
        cfg = MoeConfig.from_dict(view.config)
    except QuantkitError as e:
        return [Reason("config", "config.json", str(e), SRC["arch"])]
    fam = FAMILIES.get(spec.name)
    if fam is None or not any(a in fam["architectures"] for a in archs):
        known = ", ".join(a for f in FAMILIES.values() for a in f["architectures"])
        return [Reason("architecture", "config.json architectures", f"{archs or 'none'}: these rules cover {known}",
                       SRC["arch"])]
    reasons = _tp_heads(cfg, tp) + _tp_experts(cfg, fam, tp)
    q = view.qconfig
    if q is not None and q.get("quant_method") != "compressed-tensors":
        return reasons + [Reason("quantization method", "config.json quantization_config.quant_method",
                                 f"{q.get('quant_method')!r}: these rules cover compressed-tensors only; a config without "
                                 "quant_method is not a vLLM quantization config", SRC["method"])]
    for layer, kind, shards, lookup, k_split in vllm_layers(cfg, fam):
        schemes = [scheme(q, s) if q is not None else "ignored" for s in lookup]
        reasons += _layer(view, layer, kind, shards, schemes, k_split, tp)
    for prefix, with_quant_config in unquantized_layers(cfg, fam):
        if f"{prefix}.weight" not in view.tensors:
            reasons.append(Reason("quantized or missing unquantized layer", prefix, "vLLM builds it unquantized and loads "
                                  "its plain .weight", fam["source"]))
        elif with_quant_config and q is not None and scheme(q, prefix) != "ignored":
            reasons.append(Reason("router not ignored", prefix, "vLLM builds this router with the quantization config: "
                                  "it must be matched by an ignore entry", fam["source"]))
    return reasons


def _tp_experts(cfg, fam, tp: int) -> list[Reason]:
    if fam.get("experts_ge_tp") and cfg.moe_num_experts and tp > cfg.moe_num_experts:
        return [Reason("tensor parallelism", "num_experts", f"tp={tp} is larger than the {cfg.moe_num_experts} experts",
                       fam["source"])]
    return []


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
