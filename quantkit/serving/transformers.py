"""What transformers' ``from_pretrained`` can read of a quantkit checkpoint (ERNIE-4.5-MoE, compressed-tensors).

Read from the installed sources (``VERSIONS``) and checked against ``from_pretrained`` itself in
``tests/test_transformers_reader.py``. transformers 5 holds routed experts as fused 3-D parameters, not
``nn.Linear``s, so two paths load a quantized checkpoint:

* dense linears (attention, dense MLP, shared experts): ``CompressedTensorsHfQuantizer`` applies the
  config groups to the meta-device model and ``ModelCompressor.compress_model`` gives each module the
  compressed parameter layout, which the checkpoint tensors must fit shape for shape;
* routed experts: the experts' converter (``mlp.experts.*.{gate,up,down}_proj`` merged into ``gate_up_proj``
  / ``down_proj``) gets ``CompressedTensorsDequantize`` prepended, which dequantizes every expert with ONE
  config group's arguments and from ``weight_packed`` / ``weight_scale`` / ``weight_shape`` only.

Rules (each Reason names its upstream ``file::function``):
  1. dense asymmetric weights: the meta-device layout keeps ``weight_zero_point`` unpacked ``[N, G]``; the
     checkpoint (quantkit's and compressed-tensors' own) packs it along N: a size mismatch, refused;
  2. asymmetric routed experts: no zero point reaches the decompressor: AssertionError, refused;
  3. routed experts whose bits, symmetry or (for more than one group per row) group size differ from the
     group transformers picks for all experts: dequantized with the wrong arguments (an error or wrong values);
  4. routed experts not stored as ``weight_packed`` (left in full precision, or in the 2-bit code) in a
     quantized checkpoint: the converter finds nothing to merge, the experts stay missing, refused.
The tensor-parallel size does not enter (``from_pretrained`` is checked as one process).

Not a refusal, but worth knowing: with bf16 scales, ``from_pretrained(dtype=torch.float32)`` still holds and
computes the routed experts in bf16 (the dequantize step keeps the scale dtype), so its fp32 logits are not
quantkit's fp32 logits; the weights themselves are the same numbers (tests/test_transformers_reader.py).
"""

from __future__ import annotations

import re

from quantkit.serving import CheckpointView, Reason

VERSIONS = "transformers 5.24.0 + compressed-tensors 0.20.1"
SERVE = "python -c \"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('{path}')\""

CT_PACK = "compressed-tensors src/compressed_tensors/compressors/pack_quantized/base.py::PackedQuantizationCompressor.compress"
TF_DEQ = "transformers src/transformers/integrations/compressed_tensors.py::CompressedTensorsDequantize.convert"
TF_PICK = "transformers src/transformers/integrations/compressed_tensors.py::get_experts_scheme"
TF_CONV = "transformers src/transformers/quantizers/base.py::HfQuantizer.update_weight_conversions"

# On-disk routed-expert tensors: ``model.layers.L.mlp.experts.{e}.{proj}.{leaf}`` (Mixtral:
# ``block_sparse_moe.experts.{e}.w1/w3/w2``, which transformers' converter merges the same way).
ROUTED = re.compile(r"^(?P<stem>.+\.(?:mlp|block_sparse_moe)\.experts)\.(?P<e>\d+)\."
                    r"(?P<proj>gate_proj|up_proj|down_proj|up_gate_proj|w1|w2|w3)\.(?P<leaf>\w+)$")


def _matches(target: str, name: str) -> bool:
    """compressed-tensors' target rule for an on-disk linear: ``re:`` regex (re.match), exact name, or ``Linear``."""
    return re.match(target[3:], name) is not None if target.startswith("re:") else target in (name, "Linear")


def _group_of(qconfig: dict, name: str) -> tuple[str, dict] | None:
    if any(_matches(t, name) for t in qconfig.get("ignore") or []):
        return None
    for gname, group in (qconfig.get("config_groups") or {}).items():
        if any(_matches(t, name) for t in group.get("targets") or []):
            return gname, group
    return None


def experts_group(qconfig: dict) -> tuple[str, dict] | None:
    """The one config group transformers dequantizes every routed expert with (``get_experts_scheme``): the first
    with a ``re:`` target mentioning ``experts``, else the first with a class-name target, else the first."""
    groups = list((qconfig.get("config_groups") or {}).items())
    for pick in (lambda g: any(t.startswith("re:") and "experts" in t for t in g.get("targets") or []),
                 lambda g: any(not t.startswith("re:") for t in g.get("targets") or []),
                 lambda g: True):
        for name, group in groups:
            if pick(group):
                return name, group
    return None


def _role(stem: str, proj: str) -> str:
    return f"{stem}.*.{proj}"


def check(view: CheckpointView, tp: int = 1) -> list[Reason]:
    q = view.qconfig
    if not q:
        return []  # a plain checkpoint: transformers reads its own layout
    reasons: dict[tuple[str, str], Reason] = {}  # one per (rule, module or expert role)

    def add(key: str, where: str, what: str, rule: str, source: str) -> None:
        where = re.sub(r"\.layers\.\d+\.", ".layers.*.", where)  # one reason per role, not per layer
        reasons.setdefault((key, where), Reason(what, where, rule, source))

    picked = experts_group(q)
    for name, (_dtype, shape) in sorted(view.tensors.items()):
        m = ROUTED.match(name)
        module, leaf = name.rsplit(".", 1)
        if m:
            role = _role(m["stem"], m["proj"])
            if leaf not in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
                add("unpacked", role, "routed experts not stored as weight_packed",
                    f"'{leaf}' tensors: the experts' converter only emits weight_packed experts after its dequantize "
                    "step, so gate_up_proj/down_proj stay missing ('torch.cat(): expected a non-empty list of Tensors')",
                    f"{TF_CONV} + {TF_DEQ}")
                continue
            if leaf == "weight_zero_point":
                add("asym-experts", role, "asymmetric routed experts",
                    "each expert is decompressed from weight_packed/weight_scale/weight_shape only (no zero point): "
                    "AssertionError 'Asymmetric quant requires zero-point values'", TF_DEQ)
            if leaf == "weight_scale" and picked is not None:
                own = _group_of(q, module)
                if own is None:
                    continue
                w, pw = own[1].get("weights") or {}, picked[1].get("weights") or {}
                differs = [k for k in ("num_bits", "symmetric") if w.get(k) != pw.get(k)]
                groups_per_row = shape[-1] if len(shape) == 2 else 1
                if groups_per_row > 1 and (pw.get("strategy") != "group" or pw.get("group_size") != w.get("group_size")):
                    differs.append("group_size")
                if differs:
                    add("scheme", role, "routed experts on another scheme",
                        f"every routed expert is dequantized with config group {picked[0]}'s "
                        + ", ".join(f"{k}={pw.get(k)}" for k in differs) + f", these are in {own[0]} with "
                        + ", ".join(f"{k}={w.get(k)}" for k in differs), f"{TF_PICK} + {TF_DEQ}")
            continue
        if leaf == "weight_zero_point":
            scale = view.tensors.get(f"{module}.weight_scale")
            if scale is not None and tuple(shape) != tuple(scale[1]):
                add("asym-dense", module, "packed zero points",
                    f"the meta-device module gets weight_zero_point unpacked (e.g. {list(scale[1])}), the checkpoint holds "
                    f"it packed along N ({list(shape)}): size mismatch, refused (compressed-tensors' own asymmetric "
                    "checkpoints fail the same way)", CT_PACK)
    return list(reasons.values())
