"""FastDeploy's offline ``wint2`` checkpoint for ERNIE-4.5-MoE: every name, dtype, shape, layout and config
key FastDeploy's loader needs, each with the upstream function it was read from (``FACTS``). Nothing here
ran FastDeploy (it needs Paddle and a GPU); ``quantkit/serving/fastdeploy.py`` applies the same facts as
load rules. The 2-bit code itself (its leaves, bits and decoder) is ``quantkit.format.wint2``'s.

The layout FastDeploy reads (Paddle format, ``is_quantized``, L = layer, e = expert, K inputs, N outputs):

    config.json      dtype (no torch_dtype), quantization_config {quantization: wint2, is_quantized,
                     dense_quant_type: wint8, moe_quant_config {quant_type: w4w2, moe_w4_quant_config,
                     moe_w2_quant_config}}, moe_use_aux_free
    ernie.embed_tokens.weight, ernie.norm.weight, ernie.layers.L.{input,post_attention}_layernorm.weight
    ernie.layers.L.self_attn.qkv_proj  (q|k|v fused along N)   } wint8: quant_weight int8 [N, K] in Paddle's
    ernie.layers.L.self_attn.o_proj                            }   weight_quantize layout (``wint8_layout``),
    ernie.layers.L.mlp.{up_gate_proj (gate|up), down_proj}     }   weight_scale [N] in the model dtype
    ernie.layers.L.mlp.shared_experts.{up_gate_proj, down_proj}}   (per channel)
    ernie.layers.L.mlp.gate.weight                          fp32 [H, E]  (Paddle [in, out])
    ernie.layers.L.mlp.moe_statics.e_score_correction_bias  fp32 [1, E]
    ernie.layers.L.mlp.experts.e.{up_gate_proj (gate|up), down_proj}.{quant_weight, weight_scale,
                     super_scales, code_scale, code_zp}     the 2-bit code, weight_scale rows = K // 128

    ernie.layers.L.mlp.experts.e.{up_gate_proj, down_proj}.{quant_weight int8 [N/2, K] (``wint4_layout``),
                     weight_scale [N]}                      wint4 experts, MoE layers <= moe_w4_quant_end_layer

quantkit writes w4 experts up to a layer and the 2-bit code from there to the last MoE layer, int parts
per-channel at FastDeploy's bits (bytes: ``quantkit.format.paddle_layouts``); ``plan`` refuses what
this layout cannot express, before any work.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from quantkit.errors import UsageError
from quantkit.format import wint2
from quantkit.format.paddle_layouts import wint4_layout, wint8_layout
from quantkit.format.writer import TensorSpec
from quantkit.model.config import MoeConfig
from quantkit.quant.config import ROUTED, Plan, Recipe, Rule, candidate_modules, make_plan, resolve_recipe
from quantkit.quant.qtensor import QTensor

FORMAT_NAME = "fastdeploy/wint2"
PREFIX = "ernie"
QUANT_WEIGHT, WEIGHT_SCALE = "quant_weight", "weight_scale"
SCALE_ROW_INPUTS = 128  # the 2-bit code's weight_scale rows = K // 128
DENSE_TYPE, W4_DEFAULT_END = "wint8", 6
MODEL_DTYPE = "bfloat16"  # the code's super_scales are bf16 and FastDeploy makes them in the model dtype
W8 = Rule(bits=8, group_size=None, symmetric=True, method="rtn")  # what FastDeploy's wint8 / wint4 read
W4 = Rule(bits=4, group_size=None, symmetric=True, method="rtn")
NEAREST = "w2code (every MoE layer's routed experts in the 2-bit code), or w4 experts up to a layer and the code after"

FD = "PaddlePaddle/FastDeploy fastdeploy/"
FACTS = {  # key -> (what FastDeploy does, where it was read)
    "format": ("config.json with torch_dtype is model_format torch, with dtype paddle; both or neither raise",
               FD + "config.py::ModelConfig.read_model_config"),
    "torch_quant": ("a torch-format checkpoint's quantization_config must be block-wise FP8",
                    FD + "model_executor/layers/quantization/__init__.py::_get_offline_quant_config_name"),
    "quant_key": ("a Paddle-format quantization_config names its method in the key 'quantization'",
                  FD + "model_executor/layers/quantization/__init__.py::parse_quant_config"),
    "is_quantized": ("is_quantized (inferred true when absent) makes every linear read quant_weight + weight_scale",
                     FD + "model_executor/layers/linear.py::LinearBase.__init__"),
    "dense": ("wint2 hands non-MoE linears to dense_quant_type (default wint8; older revisions read the key "
              "dense_quant_config, same default): int8 quant_weight [N, K] (weight_shape reversed), per-channel "
              "weight_scale [N] in the model dtype",
              FD + "model_executor/layers/quantization/weight_only.py::WeightOnlyLinearMethod.create_weights"),
    "dense_layout": ("prequantized wint8 is set as stored, so it must be Paddle weight_quantize's sm75-sm90 layout "
                     "(uint8 q+128, k permuted within 16, 64-input chunks of row pairs interleaved)",
                     FD + "model_executor/layers/quantization/weight_only.py::GPUWeightOnlyLinearMethod."
                     "process_prequanted_weights; PaddlePaddle/Paddle paddle/phi/kernels/impl/"
                     "weight_quantize_kernel_gpu_impl.h::weight_permute_kernel_wint8"),
    "dispatch": ("an MoE layer with layer_idx <= moe_w4_quant_end_layer (default 6) is wint4, every later one "
                 "wint2; the w2 start/end keys are parsed but not used",
                 FD + "model_executor/layers/quantization/wint2.py::WINT2Config.from_config, get_quant_method"),
    "code2": ("2-bit experts: quant_weight uint8 [K/4, N], weight_scale uint8 [K//128, N], super_scales [N] in "
              "the model dtype, code_scale / code_zp fp32 [N]",
              FD + "model_executor/layers/moe/fused_moe_wint2_backend.py::Wint2MoeMethod.create_weights"),
    "wint4_experts": ("wint4 experts: quant_weight int8 up_gate [I, H] / down [H/2, I], weight_scale [2I] / [H]",
                      FD + "model_executor/layers/moe/fused_moe_cutlass_backend.py::CutlassWeightOnlyMoEMethod."
                      "create_weights"),
    "names": ("names are ernie.layers.L..., expert leaves from the w4w2 weight_key_map; wint2 forces the v0 loader, "
              "which has no model. -> ernie. rename",
              FD + "model_executor/models/ernie4_5_moe.py::Ernie4_5_Model.__init__, Ernie4_5_MoE.__init__; "
              "model_executor/utils.py::v1_loader_support"),
    "fused": ("q/k/v are one qkv_proj (q, k, v along N) and gate/up one up_gate_proj (gate first); prequantized "
              "weights are popped under the fused name",
              FD + "model_executor/layers/linear.py::QKVParallelLinear.weight_loader, "
              "MergedColumnParallelLinear.load_state_dict"),
    "router": ("the router is a ReplicatedLinear in Paddle layout [in, out] = [H, E], fp32",
               FD + "model_executor/models/ernie4_5_moe.py::Ernie4_5_MoE.__init__ (gate); layers/linear.py::LinearBase"),
    "bias": ("the routing bias moe_statics.e_score_correction_bias fp32 [1, E] is used only with moe_use_aux_free",
             FD + "model_executor/layers/moe/moe.py::FusedMoE.init_moe_weights"),
    "moe_layers": ("every layer >= moe_layer_start_index is an MoE layer (no interval or end index)",
                   FD + "model_executor/models/ernie4_5_moe.py::Ernie4_5_DecoderLayer.__init__"),
    "arch": ("the architecture FastDeploy registers for this model", FD + "model_executor/models/ernie4_5_moe.py::"
             "Ernie4_5_MoeForCausalLM.name"),
    "tp": ("a single directory is split by _get_tensor_parallel_mappings, which lists quant_weight but no "
           "weight_scale / super_scales / code_*: TP > 1 needs pre-sharded rank directories",
           FD + "model_executor/models/ernie4_5_moe.py::Ernie4_5_PretrainedModel._get_tensor_parallel_mappings; "
           "model_executor/load_weight_utils.py::load_composite_checkpoint"),
}


def rule_text(key: str) -> str:
    return FACTS[key][0]


def source(key: str) -> str:
    return FACTS[key][1]


# -- names --------------------------------------------------------------------------------------------

FUSED = {"q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")), "gate_proj": ("up_gate_proj", ("gate_proj", "up_proj"))}
MEMBER_OF = {m: lead for lead, (_, members) in FUSED.items() for m in members}


def disk_name(name: str) -> str:
    """quantkit's ``model.*`` name -> FastDeploy's ``ernie.*`` (``lm_head`` has no prefix in either)."""
    return PREFIX + name[len("model"):] if name.startswith("model.") else name


def fused_prefix(module: str) -> str:
    """Disk prefix of a planned linear: ``model.layers.3.self_attn.k_proj`` -> ``ernie.layers.3.self_attn.qkv_proj``."""
    stem, _, leaf = module.rpartition(".")
    lead = MEMBER_OF.get(leaf)
    return disk_name(f"{stem}.{FUSED[lead][0]}" if lead else module)


# -- what FastDeploy's create_weights declares, from a config.json ----------------------------------------

def w4_end_layer(qconfig: dict) -> int:
    """``moe_w4_quant_config.quant_end_layer`` with FastDeploy's default."""
    moe = qconfig.get("moe_quant_config") or {}
    return int((moe.get("moe_w4_quant_config") or {}).get("quant_end_layer", W4_DEFAULT_END))


def expected_tensors(config: dict) -> list[tuple[TensorSpec, str]]:
    """(spec, FACTS key) of every tensor FastDeploy looks up for a Paddle-format wint2 ``config``."""
    c = MoeConfig.from_dict(config)
    dt = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(config.get("dtype")), torch.float32)
    H, D, E, I = c.hidden_size, c.head_dim, c.moe_num_experts, c.moe_intermediate_size
    w4_end = w4_end_layer(config.get("quantization_config") or {})
    out: list[tuple[TensorSpec, str]] = [(TensorSpec(f"{PREFIX}.embed_tokens.weight", dt, (c.vocab_size, H)), "names"),
                                         (TensorSpec(f"{PREFIX}.norm.weight", dt, (H,)), "names")]

    def dense(prefix, n, k):
        out.extend([(TensorSpec(f"{prefix}.{QUANT_WEIGHT}", torch.int8, (n, k)), "dense"),
                    (TensorSpec(f"{prefix}.{WEIGHT_SCALE}", dt, (n,)), "dense")])

    for i in range(c.num_hidden_layers):
        p = f"{PREFIX}.layers.{i}"
        out += [(TensorSpec(f"{p}.{n}.weight", dt, (H,)), "names") for n in ("input_layernorm", "post_attention_layernorm")]
        dense(f"{p}.self_attn.qkv_proj", (c.num_attention_heads + 2 * c.num_key_value_heads) * D, H)
        dense(f"{p}.self_attn.o_proj", H, c.num_attention_heads * D)
        if not (E and i >= c.moe_layer_start_index):
            dense(f"{p}.mlp.up_gate_proj", 2 * c.intermediate_size, H)
            dense(f"{p}.mlp.down_proj", H, c.intermediate_size)
            continue
        out.append((TensorSpec(f"{p}.mlp.gate.weight", torch.float32, (H, E)), "router"))
        if config.get("moe_use_aux_free"):
            out.append((TensorSpec(f"{p}.mlp.moe_statics.e_score_correction_bias", torch.float32, (1, E)), "bias"))
        if c.moe_num_shared_experts:
            S = c.moe_num_shared_experts * I
            dense(f"{p}.mlp.shared_experts.up_gate_proj", 2 * S, H)
            dense(f"{p}.mlp.shared_experts.down_proj", H, S)
        for e in range(E):
            for proj, n, k in (("up_gate_proj", 2 * I, H), ("down_proj", H, I)):
                q = f"{p}.mlp.experts.{e}.{proj}"
                if i <= w4_end:  # FastDeploy's wint4 experts: int4 packed two per byte along N
                    out += [(TensorSpec(f"{q}.{QUANT_WEIGHT}", torch.int8, (n // 2, k)), "wint4_experts"),
                            (TensorSpec(f"{q}.{WEIGHT_SCALE}", dt, (n,)), "wint4_experts")]
                    continue
                out += [(TensorSpec(f"{q}.{QUANT_WEIGHT}", torch.uint8, (k // wint2.PACK, n)), "code2"),
                        (TensorSpec(f"{q}.{WEIGHT_SCALE}", torch.uint8, (k // SCALE_ROW_INPUTS, n)), "code2"),
                        (TensorSpec(f"{q}.{wint2.SUPER_SCALES}", dt, (n,)), "code2"),
                        (TensorSpec(f"{q}.{wint2.CODE_SCALE}", torch.float32, (n,)), "code2"),
                        (TensorSpec(f"{q}.{wint2.CODE_ZP}", torch.float32, (n,)), "code2")]
    if not c.tie_word_embeddings:  # ParallelLMHead's Paddle [in, out]: unverified here (the export refuses untied models)
        out.append((TensorSpec("lm_head.weight", dt, (H, c.vocab_size)), "names"))
    return out


# -- the plan: what --export fastdeploy can express ----------------------------------------------------

def _refuse(recipe: Recipe, why: str) -> UsageError:
    return UsageError(f"--export fastdeploy: recipe {recipe.name!r}: {why}; nearest expressible: {NEAREST}")


def check_model(cfg: MoeConfig) -> None:
    """Model shapes FastDeploy's wint2 layout cannot hold (a UsageError naming the rule)."""
    if cfg.arch != "ernie":
        raise UsageError(f"--export fastdeploy: FastDeploy's wint2 layout is for ERNIE-4.5-MoE, not {cfg.spec.architectures[0]}")
    if not cfg.moe_num_experts or cfg.moe_layers != list(range(cfg.moe_layer_start_index, cfg.num_hidden_layers)):
        raise UsageError(f"--export fastdeploy: {rule_text('moe_layers')}; this model's MoE layers are {cfg.moe_layers}")
    for what, k in (("hidden_size", cfg.hidden_size), ("moe_intermediate_size", cfg.moe_intermediate_size)):
        if k % SCALE_ROW_INPUTS:
            raise UsageError(f"--export fastdeploy: {what}={k} is not a multiple of 128: FastDeploy keeps K // 128 "
                             "local-scale rows per expert weight and would drop the last 64-input group's scales")
    dense_k = {"hidden_size": cfg.hidden_size, "attention width": cfg.num_attention_heads * cfg.head_dim,
               "intermediate_size": cfg.intermediate_size, "shared-expert width": cfg.moe_num_shared_experts * cfg.moe_intermediate_size}
    for what, k in dense_k.items():
        if k % 64:
            raise UsageError(f"--export fastdeploy: {what}={k}: the wint8 dense layout needs inputs in multiples of 64")
    if not cfg.tie_word_embeddings:
        raise UsageError("--export fastdeploy: an untied lm_head is not written (its Paddle layout is unverified here)")


def _per_channel(rules: set, bits: int, default: Rule) -> tuple[Rule, str | None]:
    """The per-channel symmetric rule FastDeploy's wint<bits> reads: the recipe's if it is one, else ``default``
    and the labels of the rules it replaces."""
    only = next(iter(rules)) if len(rules) == 1 else None
    if only is not None and (only.bits, only.group_size, only.symmetric) == (bits, None, True):
        return only, None
    methods = {r.method for r in rules if r is not None}
    method = methods.pop() if len(methods) == 1 and methods <= {"rtn", "gptq"} else "rtn"  # GPTQ stays GPTQ
    return replace(default, method=method), ", ".join(sorted("unquantized" if r is None else r.label for r in rules))


def plan(cfg: MoeConfig, recipe: Recipe) -> Plan:
    """The plan of a FastDeploy export, or a UsageError before any work. FastDeploy's dispatch allows routed
    experts at w4 (wint4 per-channel) up to a layer and in the 2-bit code from there to the last MoE layer;
    dense linears are wint8 per-channel. Int rules are replaced by per-channel symmetric ones at FastDeploy's
    bits (same method if rtn or gptq, else rtn) unless the recipe already says so; the entries' notes say so."""
    check_model(cfg)
    recipe = resolve_recipe(recipe, cfg)
    by_layer: dict[int, set] = {}
    for m, shape in candidate_modules(cfg):
        if len(shape) == 3:
            by_layer.setdefault(int(m.split(".")[2]), set()).add(recipe.rule_for(m))
    moe = cfg.moe_layers
    coded = [i for i in moe if all(r is not None and r.format == "code2" for r in by_layer[i])]
    if not coded:
        raise _refuse(recipe, "FastDeploy's wint2 checkpoint has routed experts in the 2-bit code, this recipe has none")
    w4, w2 = moe[:moe.index(coded[0])], moe[moe.index(coded[0]):]
    is_w4 = lambda r: r is not None and r.format == "int" and r.bits == 4  # noqa: E731
    bad = [i for i in w2 if i not in coded] + [i for i in w4 if not all(map(is_w4, by_layer[i]))]
    if bad:
        labels = ", ".join(f"{i} ({'/'.join(sorted('unquantized' if r is None else r.label for r in by_layer[i]))})"
                           for i in sorted(bad)[:4])
        raise _refuse(recipe, f"routed experts of MoE layers {labels}: FastDeploy's dispatch ({rule_text('dispatch')}) "
                      "expresses only w4 experts up to a layer, then the 2-bit code to the last MoE layer")
    code2_rules = set().union(*(by_layer[i] for i in w2))
    if len(code2_rules) > 1:
        raise _refuse(recipe, "the routed experts use different 2-bit-code rules; FastDeploy's config has one")
    rule4, was4 = _per_channel(set().union(*(by_layer[i] for i in w4)), 4, W4) if w4 else (None, None)
    rule8, was8 = _per_channel({recipe.rule_for(m) for m, shape in candidate_modules(cfg) if len(shape) == 2}, 8, W8)
    rules = [(rf"^model\.layers\.({'|'.join(map(str, w4))})\.{ROUTED}", rule4)] if w4 else []
    p = make_plan(cfg, Recipe(recipe.name, (*rules, (ROUTED, code2_rules.pop()), (".*", rule8)), version=recipe.version))

    def noted(e):
        if e.rule.format == "code2":
            return e
        was, what = (was4, "wint4 per-channel (FastDeploy's moe_w4_quant_config)") if e.is_experts else \
            (was8, "wint8 per-channel (FastDeploy's dense_quant_type)")
        return e if was is None else replace(e, note=f"--export fastdeploy: {what} instead of {was}")

    return replace(p, entries=tuple(map(noted, p.entries)))


def code2_layers(plan_: Plan) -> list[int]:
    return sorted({int(e.module.split(".")[2]) for e in plan_.entries if e.rule.format == "code2"})


# -- config.json --------------------------------------------------------------------------------------

def config_json(raw: dict, plan_: Plan) -> dict:
    """The source config.json in Paddle format with FastDeploy's wint2 ``quantization_config``."""
    layers = code2_layers(plan_)
    config = {k: v for k, v in raw.items() if k not in ("torch_dtype", "quantization_config")}
    config.update(dtype=MODEL_DTYPE, moe_use_aux_free=True)
    config["quantization_config"] = {
        "quantization": "wint2", "is_quantized": True,
        "dense_quant_type": DENSE_TYPE, "dense_quant_granularity": "per_channel",
        "moe_quant_config": {
            "quant_type": "w4w2",
            "moe_w4_quant_config": {"quant_type": "wint4", "quant_granularity": "per_channel",
                                    "quant_start_layer": 0, "quant_end_layer": layers[0] - 1},
            "moe_w2_quant_config": {"quant_type": "wint2", "quant_granularity": "pp_acc", "quant_group_size": wint2.GROUP,
                                    "quant_start_layer": layers[0], "quant_end_layer": layers[-1]}}}
    return config


def output_specs(raw: dict, plan_: Plan) -> list[TensorSpec]:
    """Every tensor of the export (FastDeploy's expected layout for the export's own config.json)."""
    return [s for s, _ in expected_tensors(config_json(raw, plan_))]


def entry_bytes(entry) -> int:
    """Bytes a planned module takes in this layout (for the report)."""
    *lead, n, k = entry.shape
    per = (sum(s.nbytes for s in wint2.tensor_specs("x", n, k)) if entry.rule.format == "code2"
           else n * k * entry.rule.bits // 8 + 2 * n)
    return per * (lead[0] if lead else 1)


# -- tensors ------------------------------------------------------------------------------------------

def plain_tensors(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """An unquantized parameter (in-memory name) -> its FastDeploy tensor(s): the router transposed to [H, E],
    router and bias fp32, the rest in the model dtype; routed experts' dense weights never get here."""
    if name.endswith(".mlp.gate.weight"):
        return {disk_name(name): t.t().contiguous().float()}
    if name.endswith("e_score_correction_bias"):
        return {disk_name(name): t.reshape(1, -1).float()}
    return {disk_name(name): t.to(torch.bfloat16)}


def _dense(prefix: str, qts: list[QTensor]) -> dict[str, torch.Tensor]:
    codes = torch.cat([q.codes for q in qts])
    if any(q.bits != 8 or not q.symmetric or q.scales.shape[-1] != 1 for q in qts):
        raise ValueError(f"{prefix}: FastDeploy's wint8 needs 8-bit symmetric per-channel codes")
    return {f"{prefix}.{QUANT_WEIGHT}": wint8_layout(codes),
            f"{prefix}.{WEIGHT_SCALE}": torch.cat([q.scales[:, 0] for q in qts]).to(torch.bfloat16)}


def _experts(mlp: str, gate, up, down) -> dict[str, torch.Tensor]:
    """Per-expert tensors, ``up_gate_proj`` = gate and up concatenated along N (gate first): the 2-bit code's
    leaves (``Code2Tensor``, [E, K/4, N]) or wint4 per-channel (``QTensor``, [E, N, K])."""
    if isinstance(gate, QTensor):
        parts = {}
        for proj, qts in (("up_gate_proj", (gate, up)), ("down_proj", (down,))):
            if any(q.bits != 4 or not q.symmetric or q.scales.shape[-1] != 1 for q in qts):
                raise ValueError(f"{mlp}.experts: FastDeploy's wint4 needs 4-bit symmetric per-channel codes")
            codes, scales = torch.cat([q.codes for q in qts], 1), torch.cat([q.scales[..., 0] for q in qts], 1)
            parts[proj] = {QUANT_WEIGHT: torch.stack([wint4_layout(c) for c in codes]), WEIGHT_SCALE: scales.to(torch.bfloat16)}
    else:
        parts = {"up_gate_proj": {leaf: torch.cat([t, up.tensors()[leaf]], dim=-1) for leaf, t in gate.tensors().items()},
                 "down_proj": down.tensors()}
    return {f"{disk_name(mlp)}.experts.{e}.{proj}.{leaf}": t[e].contiguous()
            for proj, leaves in parts.items() for leaf, t in leaves.items() for e in range(t.shape[0])}


def module_tensors(module: str, qtensors: dict, layer_prefix: str) -> dict[str, torch.Tensor]:
    """FastDeploy tensors of planned ``module`` from its layer's quantized modules ``qtensors`` (names
    relative to ``layer_prefix``). A fused group is written whole by its last member (``v_proj``,
    ``up_proj``); the other members return nothing, as do routed experts' gate and up but the last."""
    rel = module[len(layer_prefix) + 1:]
    stem, _, leaf = rel.rpartition(".")
    if stem.rpartition(".")[2] == "experts":  # routed experts (not shared_experts)
        if leaf != "down_proj":
            return {}
        mlp = stem[: -len(".experts")]
        return _experts(f"{layer_prefix}.{mlp}", *(qtensors[f"{stem}.{p}"] for p in ("gate_proj", "up_proj", "down_proj")))
    lead = MEMBER_OF.get(leaf)
    if lead is None:
        return _dense(fused_prefix(module), [qtensors[rel]])
    members = FUSED[lead][1]
    if leaf != members[-1]:
        return {}
    return _dense(fused_prefix(module), [qtensors[f"{stem}.{m}"] for m in members])


def is_fastdeploy_config(config: dict) -> bool:
    """Whether a config.json is a FastDeploy wint2 checkpoint's (``quantization: wint2``)."""
    return (config.get("quantization_config") or {}).get("quantization") == "wint2"
