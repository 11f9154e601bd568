"""An MoE family as data (``ArchSpec``) and the one map between quantkit's canonical names and the Hub's.

In memory every family uses quantkit's canonical module names (ERNIE's): ``model.layers.N.self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj`` (dense MLP), ``mlp.experts.{gate,up,down}_proj`` (routed experts, 3-D ``[E, N, K]``),
``mlp.shared_experts.{gate,up,down}_proj``, the router ``mlp.gate`` (fp32 ``[E, H]``) and its correction bias
``mlp.moe_statics.e_score_correction_bias``. On disk each family keeps its Hub names, one tensor per expert.
``ArchSpec.names`` lists, relative to ``model.layers.N.``, the canonical paths whose Hub path differs (``{e}``
stands for the expert index); :func:`hub_tensors`, :func:`hub_prefixes` and :func:`hub_regex` are the only
functions that apply it: the loader reads through them and every writer writes through them. Norms keep the
same name in memory and on disk for every family (``q_norm``/``k_norm``, ``input_layernorm``...).

Adding a family whose math exists: one file here with its ``ArchSpec`` and a line in ``arch/__init__.py``. New math
is a new layer: e.g. multi-head latent attention is ``attention="mla"`` (``ATTENTIONS``), an entry of
``causal_lm.ATTENTION_LAYERS`` (how to build it from a config and a layer index, and its quantizable linears --
``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``, ``kv_b_proj``, ``o_proj`` -- for
``quant.config.candidate_modules``), its config (``MoeConfig.mla``), and its fused groups in ``fused``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from quantkit.errors import UsageError

ROPE_STYLES = ("interleaved", "half")  # GPT-J pairs (2i, 2i+1) | rotate-half pairs (i, i + D/2)
QK_NORMS = ("none", "head", "proj")  # no q/k norm | RMSNorm over each head's D | over the whole q / k projection
ATTENTIONS = ("gqa", "mla")  # grouped-query | multi-head latent (DeepSeek-V3: quantkit.model.mla, its own linears)
LAYER = re.compile(r"^(model\.layers\.\d+)\.(.+)$")


@dataclass(frozen=True)
class ArchSpec:
    """One family. Config: ``config_keys`` maps ``MoeConfig`` fields to the Hub config key read for them (a field not
    listed reads the key of its own name), ``defaults`` are the family's values for keys a config.json may omit,
    ``fixed`` are values the family always has (no key), ``required`` are Hub keys that must be present and
    ``unsupported`` are (Hub key, the only value quantkit supports). A Hub key ``a|b`` reads ``a``, else ``b``
    (transformers 5 saves some keys under new names, e.g. Qwen3-MoE's ``num_experts`` as ``num_local_experts``)."""

    name: str                                         # short name: 'ernie', 'mixtral', ... (config ``arch``)
    architectures: tuple[str, ...]                    # HF ``architectures`` entries it answers to
    model_type: str                                   # HF ``model_type``
    config_keys: tuple[tuple[str, str], ...] = ()     # (MoeConfig field, Hub config key)
    defaults: tuple[tuple[str, Any], ...] = ()        # (MoeConfig field, value when the key is absent)
    fixed: tuple[tuple[str, Any], ...] = ()           # (MoeConfig field, value), whatever config.json says
    required: tuple[str, ...] = ()                    # Hub config keys without which the config is refused
    unsupported: tuple[tuple[str, Any], ...] = ()     # (Hub config key, the only supported value)
    attention: str = "gqa"                            # one of ATTENTIONS
    names: tuple[tuple[str, str], ...] = ()           # (canonical path, Hub path) under model.layers.N.
    router_bias_rank: int = 0                         # correction bias: 0 none, 1 ``[E]``, 2 ``[1, E]`` (as the Hub stores it)
    never_quantized: tuple[str, ...] = ()             # canonical paths (under a layer) servers must see unquantized,
    # besides the router and the LM head (e.g. Qwen2-MoE's ``mlp.shared_expert_gate``)
    ignored_tensors: str = r"(^|\.)mtp|rotary_emb\.inv_freq$"  # Hub tensors some releases carry and nobody reads
    extra_layers_ignored: bool = False                # tensors of layers >= num_hidden_layers (GLM's MTP layer) are ignored
    fused: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
    # canonical linear names (last component) that vLLM loads fused, so they must share one rule
    ct_class_target: str = ""                         # regex over canonical paths under a layer: the config group
    # holding those linears also gets the class target ``Linear``, for families whose vLLM loader looks their scheme
    # up by a name no Hub-name regex matches (``serving/vllm.py::FAMILIES``: Mixtral's experts, OLMoE's attention)
    rope_types: tuple[str, ...] = ("default",)        # rope_parameters / rope_scaling types the family's attention supports

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise UsageError(f"arch {self.name}: attention {self.attention!r} is not one of {', '.join(ATTENTIONS)}")
        if self.router_bias_rank not in (0, 1, 2):
            raise UsageError(f"arch {self.name}: router_bias_rank must be 0, 1 or 2")
        # longest canonical path first, so that mlp.moe_statics.e_score_correction_bias wins over mlp.moe_statics
        object.__setattr__(self, "names", tuple(sorted(self.names, key=lambda kv: -len(kv[0]))))


def per_expert(hub_stem: str, gate: str = "gate_proj", up: str = "up_proj", down: str = "down_proj"
               ) -> tuple[tuple[str, str], ...]:
    """Name-map entries for routed experts stored per expert as ``{hub_stem}.{e}.{gate|up|down}``."""
    return tuple((f"mlp.experts.{c}", f"{hub_stem}.{{e}}.{h}") for c, h in
                 (("gate_proj", gate), ("up_proj", up), ("down_proj", down)))


def _resolve(spec: ArchSpec, name: str) -> tuple[str, str, str] | None:
    """canonical name -> (layer prefix, Hub path template, remaining tail) when an entry of the map applies."""
    m = LAYER.match(name)
    if not m:
        return None
    layer, rest = m.groups()
    for canon, hub in spec.names:
        if rest == canon or rest.startswith(canon + "."):
            return layer, hub, rest[len(canon):]
    return None


def hub_prefixes(spec: ArchSpec, module: str, num_experts: int) -> list[str]:
    """Hub prefixes of a canonical module: one, or one per expert for a routed-experts module
    (``model.layers.3.mlp.experts.down_proj`` -> ``model.layers.3.block_sparse_moe.experts.{e}.w2``, e < E)."""
    r = _resolve(spec, module)
    if r is None:
        return [module]
    layer, hub, tail = r
    if "{e}" in hub:
        return [f"{layer}.{hub.format(e=e)}{tail}" for e in range(num_experts)]
    return [f"{layer}.{hub}{tail}"]


def hub_tensors(spec: ArchSpec, param: str, num_experts: int) -> list[str]:
    """Hub tensors that make up canonical parameter ``param``: one, or one per expert. A 3-D experts parameter
    (``mlp.experts.gate_proj``) reads ``....{e}.gate_proj.weight``; a quantized one
    (``mlp.experts.gate_proj.weight_packed``) ``....{e}.gate_proj.weight_packed``."""
    r = _resolve(spec, param)
    if r is not None and "{e}" in r[1] and not r[2]:
        return [f"{p}.weight" for p in hub_prefixes(spec, param, num_experts)]
    return hub_prefixes(spec, param, num_experts)


def hub_regex(spec: ArchSpec, module: str) -> str:
    """A compressed-tensors ``re:`` target matching the Hub linears of a canonical module (every expert)."""
    r = _resolve(spec, module)
    if r is None:
        return "re:^" + re.escape(module) + "$"
    layer, hub, tail = r
    body = r"\d+".join(re.escape(part) for part in hub.split("{e}"))
    return "re:^" + re.escape(layer) + r"\." + body + re.escape(tail) + "$"


def hub_path(spec: ArchSpec, path: str) -> str:
    """A canonical path under a layer (``mlp.gate``) -> its Hub path (``block_sparse_moe.gate``)."""
    return hub_prefixes(spec, f"model.layers.0.{path}", 1)[0][len("model.layers.0."):]


def always_ignored(spec: ArchSpec) -> list[str]:
    """What servers must leave unquantized whatever the plan: the LM head, the fp32 router, and the family's
    ``never_quantized`` linears (compressed-tensors ``ignore`` entries)."""
    paths = ("mlp.gate",) + spec.never_quantized
    return ["lm_head"] + [r"re:.*\." + re.escape(hub_path(spec, p)) + "$" for p in paths]
