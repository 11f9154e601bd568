"""Quantization configs: a ``Rule`` per weight, a ``Recipe`` of ordered (regex -> rule) pairs, and the ``Plan``.

Module names are the in-memory ones: ``model.layers.3.self_attn.q_proj``, ``model.layers.3.mlp.gate_proj``
(dense MLP), ``model.layers.3.mlp.shared_experts.up_proj``, and ``model.layers.3.mlp.experts.down_proj``
for all routed experts of a layer at once (3-D, ``[E, N, K]``). A rule's pattern is a Python regex
searched in that name (``re.search``); the first matching rule wins; a module that matches no rule or
matches an ``ignore`` pattern stays unquantized.

Names are canonical for every family (``quantkit.model.arch`` maps them to each family's Hub names on write).
Never quantized, whatever the recipe says (they are not candidates at all): the router ``mlp.gate``,
``moe_statics``, Qwen2-MoE's ``mlp.shared_expert_gate``, embeddings, norms and the (tied) ``lm_head``.

Two formats: ``format="int"`` (grouped integer grids, compressed-tensors) and ``format="code2"`` (the 2-bit
convolutional code of ``quantkit.format.wint2``, bits=2 and 64-input groups by construction, for routed
experts only; its ``method`` is rtn (plain encoder) or gptq (Hessian-aware encoder)). Built-in mixed
recipes: ``w2code`` (routed experts in the code, the rest w4g128), ``w2code-w4edges`` (also the first and
last MoE layers' experts at w4g128), ``w2g64-experts`` (routed experts int2 g64 asym, the rest w4g128:
the int baseline at the same non-expert rule); ``layer_range_recipe`` builds FastDeploy-style ``w4w2``
layer ranges.

``format="trellis"`` is the trellis code of ``quantkit.format.trellis`` (QTIP / EXL3 class), routed experts
only, ``bits`` 2/3/4 per weight, ``state_bits`` L (16 by default; a smaller L is an explicit CPU option: a
faster encoder, a higher error), ``seed`` the incoherence signs' draw (0 by default); its ``method`` is rtn
(plain Viterbi) or gptq (LDLQ with the Hessians).
Built-in: ``w2trellis`` (routed experts at 2 bits, the rest w4g128). A recipe's ``bits_per_weight`` (a bit
budget, CLI ``--bits-per-weight``) lets ``quantkit.pipeline.budget`` pick the trellis bits per routed-expert
tensor from measured sensitivity; it resolves the budget into per-tensor rules before ``make_plan``, which
refuses an unresolved budget.

Group-size fallback: a group must divide the input dim K for the formats servers read. Where the
requested group does not, the largest power of two below it that divides K (and is at least 8) is used,
and the plan records it per module (``Plan.entries[i].note``). If none exists the plan is an error.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from quantkit.errors import UsageError
from quantkit.model.config import MoeConfig

CONFIG_VERSION = 2  # 2: rules gained ``format``
BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, None)  # None = one group per output channel ("channel" strategy)
METHODS = ("rtn", "gptq", "awq", "awq+gptq")
FORMATS = ("int", "code2", "trellis")
TRELLIS_BITS = (2, 3, 4)
CODE2_METHODS = ("rtn", "gptq")


@dataclass(frozen=True)
class Rule:
    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    method: str = "rtn"
    clip_search: bool | None = None  # MSE-optimal clipping per group (as HQQ/AWQ search the range), weighted by
    # diag(H) where calibration gives one; None: on for the calibrated methods, off for plain RTN (``use_clip``)
    act_order: bool = True  # GPTQ: visit columns by decreasing diag(H), static groups (no g_idx)
    awq_block: bool = True  # AWQ: decide the q/k/v and norm->gate/up scales at the attention / MLP output
    # (quantkit.quant.awq); off: the exact per-linear error alone (benchmarks/peers.py: gap 8.04 on, 10.26 off)
    damp: float = 0.1  # GPTQ's dampening: λ = damp · mean diag(H) added to H's diagonal. Larger fits the
    # calibration text less closely; 0.1 (GPTQ's usual 0.01 before issue 15): on the dense SmolLM2, calibrated on
    # English and scored on Chinese, w4g64 gap 9.85 -> 8.00; on the MoE demo mixed (README, benchmarks/peers.py)
    fp_target: bool = False  # GPTQ: aim at the fp model's outputs (asymmetric calibration; attention, dense and
    # shared-expert linears), which costs a second (fp) hidden-state stream during calibration; off: not yet
    # shown to help end to end (benchmarks/peers.py)
    format: str = "int"  # "int" or "code2" (the 2-bit convolutional code; bits=2, group_size=64; the code
    # has its own per-column affine codebook, so ``symmetric`` and ``clip_search`` do not apply to it)
    state_bits: int = 16  # the trellis code's state size L (format="trellis" only)
    seed: int = 0  # the trellis code's incoherence sign draw (format="trellis" only; the signs are stored in
    # suh/svh, so a checkpoint decodes the same whatever the seed; another seed is another sample of the error)

    def __post_init__(self):
        if self.format not in FORMATS:
            raise UsageError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.format == "code2" and (self.bits, self.group_size) != (2, 64):
            raise UsageError(f"the 2-bit code has bits=2 and group_size=64, got bits={self.bits}, group_size={self.group_size}")
        if self.format == "trellis":
            from quantkit.format.trellis import L_RANGE

            if self.bits not in TRELLIS_BITS:
                raise UsageError(f"the trellis code takes bits 2, 3 or 4, got {self.bits}")
            if not L_RANGE[0] <= self.state_bits <= L_RANGE[1]:
                raise UsageError(f"the trellis code's state_bits must be in {L_RANGE[0]}..{L_RANGE[1]}, got {self.state_bits}")
            if not isinstance(self.seed, int) or self.seed < 0:
                raise UsageError(f"the trellis code's seed must be a non-negative integer, got {self.seed!r}")
        if self.bits not in BITS:
            raise UsageError(f"bits must be one of {BITS}, got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise UsageError(f"group size must be one of 32, 64, 128 or per-channel, got {self.group_size}")
        if self.method not in METHODS:
            raise UsageError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float)) or not 0 < self.damp <= 100:
            raise UsageError(f"damp (GPTQ's dampening, a fraction of H's mean diagonal) must be a number in (0, 100], got {self.damp!r}")

    @property
    def use_clip(self) -> bool:
        return self.method != "rtn" if self.clip_search is None else self.clip_search

    @property
    def label(self) -> str:
        if self.format == "code2":
            return "w2code"
        if self.format == "trellis":
            return f"w{self.bits}trellis" + ("" if self.state_bits == 16 else f"-L{self.state_bits}")
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return f"w{self.bits}{g}-{'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.format != "trellis":
            del d["state_bits"], d["seed"]
        if "awq" not in self.method:  # an AWQ setting: other rules (and their checkpoints) read as before it
            del d["awq_block"]
        if "gptq" not in self.method or self.format != "int":  # a GPTQ setting, as above
            del d["damp"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Rule":
        known = {"bits", "group_size", "symmetric", "method", "clip_search", "act_order", "fp_target", "format", "state_bits",
                 "seed", "awq_block", "damp"}
        unknown = set(d) - known - {"pattern"}
        if unknown:
            raise UsageError(f"recipe rule has unknown key(s): {', '.join(sorted(unknown))}")
        code2 = d.get("format") == "code2"
        gs = d.get("group_size", 64 if code2 else 128)
        if gs in ("channel", -1, 0):
            gs = None
        extra = {"bits": d.get("bits", 2), "symmetric": d.get("symmetric", False)} if code2 else {}
        if d.get("format") == "trellis":  # no groups: one scale per row and column (``group_size`` is ignored)
            gs, extra = None, {"bits": d.get("bits", 2), "symmetric": True}
        else:
            for key in ("state_bits", "seed"):
                if key in d:
                    raise UsageError(f"{key} is a trellis-code setting (format: trellis)")
        return cls(**{**{k: v for k, v in d.items() if k in known}, **extra, "group_size": gs})


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[tuple[str, Rule], ...]
    ignore: tuple[str, ...] = ()
    version: int = CONFIG_VERSION
    bits_per_weight: float | None = None  # bit budget of the trellis-coded routed experts (quantkit.pipeline.budget)

    def __post_init__(self):
        b = self.bits_per_weight
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0):
            raise UsageError(f"recipe {self.name!r}: bits_per_weight must be a positive number, got {b!r}")
        for pat in (*[p for p, _ in self.rules], *self.ignore):
            try:
                re.compile(pat)
            except re.error as e:
                raise UsageError(f"recipe {self.name!r}: bad regex {pat!r} ({e})") from None
        if not self.rules:
            raise UsageError(f"recipe {self.name!r} has no rules")

    def rule_for(self, module: str) -> Rule | None:
        if any(re.search(p, module) for p in self.ignore):
            return None
        return next((r for p, r in self.rules if re.search(p, module)), None)

    def with_method(self, method: str | None = None, clip_search: bool | None = None) -> "Recipe":
        def upd(r: Rule) -> Rule:
            return replace(r, method=method or r.method, clip_search=r.clip_search if clip_search is None else clip_search)

        return replace(self, rules=tuple((p, upd(r)) for p, r in self.rules))

    def to_dict(self) -> dict:
        budget = {} if self.bits_per_weight is None else {"bits_per_weight": self.bits_per_weight}
        return {"name": self.name, "version": self.version, "ignore": list(self.ignore), **budget,
                "rules": [{"pattern": p, **r.to_dict()} for p, r in self.rules]}

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        if not isinstance(d, dict) or not isinstance(d.get("rules"), list):
            raise UsageError("a recipe must be an object with a 'rules' list")
        if d.get("version", CONFIG_VERSION) > CONFIG_VERSION:
            raise UsageError(f"recipe version {d['version']} is newer than this quantkit understands ({CONFIG_VERSION})")
        rules = []
        for r in d["rules"]:
            if not isinstance(r, dict) or "pattern" not in r:
                raise UsageError("each recipe rule needs a 'pattern'")
            rules.append((r["pattern"], Rule.from_dict(r)))
        return cls(name=str(d.get("name", "custom")), rules=tuple(rules), ignore=tuple(d.get("ignore", ())),
                   bits_per_weight=d.get("bits_per_weight"))

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix.lower() in (".yaml", ".yml"):
                import yaml

                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
        except Exception as e:  # json/yaml syntax errors: one line
            raise UsageError(f"{path}: cannot parse recipe ({str(e).splitlines()[0]})") from None
        return cls.from_dict(d)


def simple_recipe(bits: int, group_size: int | None, symmetric: bool, name: str | None = None) -> Recipe:
    rule = Rule(bits=bits, group_size=group_size, symmetric=symmetric)
    return Recipe(name=name or rule.label, rules=((".*", rule),))


CODE2 = Rule(bits=2, group_size=64, symmetric=False, format="code2")
W4 = Rule(bits=4, group_size=128, symmetric=True)
TRELLIS2 = Rule(bits=2, group_size=None, symmetric=True, format="trellis")
ROUTED = r"mlp\.experts\."


def layer_range_recipe(name: str, ranges: list[tuple[int, int, Rule]], rest: Rule = W4) -> Recipe:
    """FastDeploy-style per-layer-range rules for the routed experts (``moe_quant_type: w4w2``):
    ``ranges`` = [(first, last, rule)] (inclusive), the rest of the model (and experts of other layers) ``rest``."""
    rules = []
    for first, last, rule in ranges:
        if first > last or first < 0:
            raise UsageError(f"bad layer range {first}..{last}")
        layers = "|".join(str(i) for i in range(first, last + 1))
        rules.append((rf"^model\.layers\.({layers})\.{ROUTED}", rule))
    return Recipe(name=name, rules=(*rules, (".*", rest)))


def _edges_recipe(cfg: MoeConfig) -> Recipe:
    """``w2code-w4edges`` for a model: experts of the first and last MoE layers at w4g128, the others in the code."""
    moe = cfg.moe_layers
    ranges = [(moe[0], moe[0], W4), (moe[-1], moe[-1], W4)] if len(moe) > 1 else []
    return layer_range_recipe("w2code-w4edges", [*ranges, (0, cfg.num_hidden_layers - 1, CODE2)])


BUILTIN_RECIPES = {
    "w4g128": simple_recipe(4, 128, True, "w4g128"),
    "w4g128-asym": simple_recipe(4, 128, False, "w4g128-asym"),
    "w3g128": simple_recipe(3, 128, False, "w3g128"),
    "w2g64": simple_recipe(2, 64, False, "w2g64"),
    "w8": simple_recipe(8, None, True, "w8"),
    "w2code": Recipe(name="w2code", rules=((ROUTED, CODE2), (".*", W4))),
    "w2trellis": Recipe(name="w2trellis", rules=((ROUTED, TRELLIS2), (".*", W4))),
    "w2g64-experts": Recipe(name="w2g64-experts", rules=((ROUTED, Rule(bits=2, group_size=64, symmetric=False)), (".*", W4))),
}
MODEL_RECIPES = {"w2code-w4edges": _edges_recipe}  # built per model (they name layer ranges)


def get_recipe(name_or_path: str, cfg: MoeConfig | None = None) -> Recipe:
    """A built-in recipe or a recipe file. Model-dependent built-ins (``w2code-w4edges``) need ``cfg``;
    without it they are returned as a placeholder that ``resolve_recipe`` fills in at plan time."""
    if name_or_path in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[name_or_path]
    if name_or_path in MODEL_RECIPES:
        if cfg is not None:
            return MODEL_RECIPES[name_or_path](cfg)
        return Recipe(name=name_or_path, rules=((ROUTED, CODE2), (".*", W4)))
    p = Path(name_or_path)
    if p.is_file():
        return Recipe.from_file(p)
    raise UsageError(f"unknown recipe {name_or_path!r}: use one of {', '.join([*BUILTIN_RECIPES, *MODEL_RECIPES])} "
                     "or a .json/.yaml file")


def resolve_recipe(recipe: Recipe, cfg: MoeConfig) -> Recipe:
    """Fill a model-dependent built-in (the placeholder ``get_recipe`` returns without a model) for ``cfg``,
    keeping the method and clipping the user chose; any other recipe is returned as is."""
    def shape(r: Recipe):
        return [(p, x.format, x.bits, x.group_size, x.symmetric) for p, x in r.rules]

    if recipe.name in MODEL_RECIPES and shape(recipe) == shape(get_recipe(recipe.name)):
        first = recipe.rules[0][1]
        return MODEL_RECIPES[recipe.name](cfg).with_method(first.method, first.clip_search)
    return recipe


# -- the plan: which module gets which rule ---------------------------------------------------------

@dataclass(frozen=True)
class PlanEntry:
    module: str
    shape: tuple[int, ...]  # (N, K) or (E, N, K) for routed experts
    rule: Rule  # as requested by the recipe
    group_size: int  # effective: the fallback where needed; K for per-channel
    note: str = ""

    @property
    def is_experts(self) -> bool:
        return len(self.shape) == 3


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    entries: tuple[PlanEntry, ...]
    unquantized: tuple[str, ...] = field(default=())

    def entry(self, module: str) -> PlanEntry | None:
        return next((e for e in self.entries if e.module == module), None)


def effective_group(group: int | None, k: int) -> tuple[int, str]:
    if group is None:
        return k, ""
    if k % group == 0:
        return group, ""
    g = group // 2
    while g >= 8:
        if k % g == 0:
            return g, f"group {group} does not divide K={k}: using {g}"
        g //= 2
    raise UsageError(f"no power-of-two group size <= {group} divides K={k}")


def candidate_modules(cfg: MoeConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight that may be quantized, in checkpoint order. The attention's linears come from
    the family's attention layer (``causal_lm.ATTENTION_LAYERS[spec.attention].linears``)."""
    from quantkit.model.causal_lm import ATTENTION_LAYERS

    H = cfg.hidden_size
    attention = ATTENTION_LAYERS[cfg.spec.attention].linears(cfg)
    out = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out += [(f"{p}.self_attn.{name}", shape) for name, shape in attention]
        if not cfg.is_moe_layer(i):
            I = cfg.intermediate_size
            out += [(f"{p}.mlp.gate_proj", (I, H)), (f"{p}.mlp.up_proj", (I, H)), (f"{p}.mlp.down_proj", (H, I))]
            continue
        E, I = cfg.moe_num_experts, cfg.moe_intermediate_size
        if cfg.shared_width:
            S = cfg.shared_width
            out += [(f"{p}.mlp.shared_experts.gate_proj", (S, H)), (f"{p}.mlp.shared_experts.up_proj", (S, H)),
                    (f"{p}.mlp.shared_experts.down_proj", (H, S))]
        out += [(f"{p}.mlp.experts.gate_proj", (E, I, H)), (f"{p}.mlp.experts.up_proj", (E, I, H)), (f"{p}.mlp.experts.down_proj", (E, H, I))]
    return out


def _joint_k(cfg: MoeConfig, recipe: Recipe, name: str, rule: Rule, shape: tuple[int, ...]) -> int:
    """The K a group must divide: the module's own, or for routed experts the gcd of the layer's expert Ks
    (H for gate/up, I for down) when the three share a rule, so that the fallback gives all of them one
    group (vLLM: "All MoE projections need to have same quantization scheme")."""
    if len(shape) != 3 or rule.group_size is None:  # per channel: one scale per row whatever K is
        return shape[-1]
    stem = name.rpartition(".")[0]
    same = all(recipe.rule_for(f"{stem}.{leaf}") == rule for leaf in ("gate_proj", "up_proj", "down_proj"))
    return math.gcd(cfg.hidden_size, cfg.moe_intermediate_size) if same else shape[-1]


def make_plan(cfg: MoeConfig, recipe: Recipe) -> Plan:
    """Resolve the recipe against the model; validate that fused groups (``ArchSpec.fused``: q/k/v, gate/up) share
    one rule."""
    if recipe.bits_per_weight is not None:
        raise UsageError(f"recipe {recipe.name!r} has a bit budget (bits_per_weight {recipe.bits_per_weight}), which "
                         "quantkit.pipeline.budget.apply_budget resolves against the model's weights before planning")
    recipe = resolve_recipe(recipe, cfg)
    entries, unquantized = [], []
    for name, shape in candidate_modules(cfg):
        rule = recipe.rule_for(name)
        if rule is None:
            unquantized.append(name)
            continue
        if rule.format == "code2":
            if len(shape) != 3:
                raise UsageError(f"recipe {recipe.name!r}: {name} matches a 2-bit code rule, which is for routed experts only")
            if shape[-1] % 64:
                raise UsageError(f"recipe {recipe.name!r}: {name} has K={shape[-1]} inputs; the 2-bit code needs a multiple of 64")
            if rule.method not in CODE2_METHODS:
                raise UsageError(f"recipe {recipe.name!r}: method {rule.method!r} is not available for the 2-bit code (use rtn or gptq)")
            entries.append(PlanEntry(name, shape, rule, 64))
            continue
        if rule.format == "trellis":
            if len(shape) != 3:
                raise UsageError(f"recipe {recipe.name!r}: {name} matches a trellis rule, which is for routed experts only")
            if shape[-1] % 16 or shape[-2] % 16:
                raise UsageError(f"recipe {recipe.name!r}: {name} is {shape[-2]}x{shape[-1]}; the trellis code needs "
                                 "multiples of 16")
            if rule.method not in CODE2_METHODS:
                raise UsageError(f"recipe {recipe.name!r}: method {rule.method!r} is not available for the trellis code "
                                 "(use rtn or gptq)")
            entries.append(PlanEntry(name, shape, rule, shape[-1]))
            continue
        g, note = effective_group(rule.group_size, _joint_k(cfg, recipe, name, rule, shape))
        if note and len(shape) == 3:
            note += " (one group for the layer's routed experts, which servers load as one MoE)"
        entries.append(PlanEntry(name, shape, rule, g, note))
    by_name = {e.module: e for e in entries}
    names = {name for name, _ in candidate_modules(cfg)}
    for name, _ in candidate_modules(cfg):
        stem, _, leaf = name.rpartition(".")
        for group in cfg.spec.fused:
            if leaf != group[0]:
                continue
            members = [f"{stem}.{m}" for m in group if f"{stem}.{m}" in names]  # MLA's q_proj has no k/v
            kinds = {(by_name[m].rule.format, by_name[m].rule.bits, by_name[m].group_size, by_name[m].rule.symmetric)
                     if m in by_name else None for m in members}
            if len(kinds) > 1:
                raise UsageError(f"recipe {recipe.name!r}: {', '.join(members)} are loaded fused by servers and must share one rule")
    return Plan(recipe, tuple(entries), tuple(unquantized))
