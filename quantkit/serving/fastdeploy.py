"""Would FastDeploy load this checkpoint? Its loader's rules for an offline ``wint2`` ERNIE-4.5-MoE checkpoint,
applied to a ``CheckpointView`` (config.json and tensor headers). The facts (names, dtypes, shapes, config keys,
layer dispatch) and their upstream sources are ``quantkit.format.fastdeploy.FACTS``; this module only applies
them. Nothing here ran FastDeploy.

Scope: FastDeploy's ``wint2`` quantization (dense ``wint8``, MoE ``w4w2``) in Paddle format, at TP = 1. A
torch-format checkpoint without ``quantization_config`` (the Hub's bf16 ERNIE-4.5 ``-PT``) is left to
FastDeploy's v1 loader and answered yes without further checks; other quantization methods are "not covered".
Tensors FastDeploy never asks for are not reasons (its v0 loader pops what it needs and ignores the rest).
"""

from __future__ import annotations

import re

from quantkit.errors import QuantkitError
from quantkit.format import fastdeploy as fd
from quantkit.serving import CheckpointView, Reason

SERVE = ("python -m fastdeploy.entrypoints.openai.api_server --model {path} --tensor-parallel-size {tp} --port 8180  "
         "(FastDeploy docs/get_started/ernie-4.5.md; the checkpoint's quantization_config says wint2)")
VERSIONS = ("FastDeploy develop as stored 2025-26: layers/quantization/wint2.py @bc59992f, "
            "layers/moe/fused_moe_wint2_backend.py @df459439, layers/quantization/weight_only.py @eba1d6ba, "
            "layers/quantization/__init__.py @013ec981, models/ernie4_5_moe.py @0007e412, config.py, layers/linear.py, "
            "layers/moe/moe.py, layers/moe/fused_moe_cutlass_backend.py, model_executor/utils.py, load_weight_utils.py; "
            "Paddle weight_quantize_kernel_gpu_impl.h @2c8abd87")
NOT_COVERED = "quantkit's FastDeploy rules cover the offline wint2 checkpoint (dense wint8, MoE w4w2) only"
ARCH = "Ernie4_5_MoeForCausalLM"


def _r(what: str, where: str, key: str) -> Reason:
    return Reason(what, where, fd.rule_text(key), fd.source(key))


def check(view: CheckpointView, tp: int = 1) -> list[Reason]:
    """The reasons FastDeploy would refuse ``view`` at tensor-parallel size ``tp`` (empty: it loads it)."""
    config, qc = view.config, view.qconfig
    reasons, torch_format = _model_format(config)
    if qc is None:
        if torch_format and not reasons:
            return []  # the Hub's bf16 checkpoints: FastDeploy's v1 loader, outside these rules
        return reasons + [Reason("no quantization_config", "config.json", NOT_COVERED, fd.source("quant_key"))]
    if torch_format:
        reasons.append(_r(f"a torch-format checkpoint with quant_method {qc.get('quant_method')!r}",
                          "config.json: torch_dtype", "torch_quant"))
    if "quantization" not in qc:  # (a torch-format config needs none; its reason above is final)
        return reasons or [_r("quantization_config has no 'quantization' key", "quantization_config", "quant_key")]
    fatal = _quant_config(config, qc)
    if fatal:
        return reasons + fatal
    try:
        expected = fd.expected_tensors(config)
    except QuantkitError as e:
        return reasons + [_r(f"config.json does not describe an ERNIE-4.5-MoE ({e})", "config.json", "arch")]
    reasons += _model_shape(config) + _tensors(view, expected)
    if tp > 1:
        reasons.append(_r(f"tensor-parallel size {tp} on one un-sharded directory", "--tp", "tp"))
    return reasons


def _model_format(config: dict) -> tuple[list[Reason], bool]:
    has_torch, has_paddle = "torch_dtype" in config, "dtype" in config
    if has_torch and has_paddle:
        return [_r("config.json has both torch_dtype and dtype", "config.json", "format")], True
    if not (has_torch or has_paddle):
        return [_r("config.json has neither torch_dtype nor dtype", "config.json", "format")], False
    return [], has_torch


def _quant_config(config: dict, qc: dict) -> list[Reason]:
    """Config keys without which the tensor rules below do not apply (each reason is final)."""
    if qc["quantization"] != "wint2":
        return [Reason(f"quantization {qc['quantization']!r}", "quantization_config.quantization", NOT_COVERED,
                       fd.source("quant_key"))]
    out = []
    if qc.get("is_quantized") is False or ("is_quantized" not in qc and "is_moe_quantized" in qc):
        out.append(_r("is_quantized is not true: FastDeploy would read bf16 .weight tensors and quantize online",
                      "quantization_config.is_quantized", "is_quantized"))
    if qc.get("dense_quant_type", fd.DENSE_TYPE) != fd.DENSE_TYPE:
        out.append(Reason(f"dense_quant_type {qc['dense_quant_type']!r}", "quantization_config.dense_quant_type",
                          NOT_COVERED, fd.source("dense")))
    moe = qc.get("moe_quant_config") or {}
    if moe.get("quant_type", "w4w2") != "w4w2":
        out.append(_r(f"moe_quant_config.quant_type {moe['quant_type']!r} selects another expert key map",
                      "quantization_config.moe_quant_config.quant_type", "names"))
    w4 = (moe.get("moe_w4_quant_config") or {}).get("quant_type", "wint4")
    if w4 != "wint4":
        out.append(Reason(f"moe_w4_quant_config.quant_type {w4!r}", "quantization_config.moe_quant_config",
                          NOT_COVERED, fd.source("dispatch")))
    archs = config.get("architectures") or []
    if archs[:1] != [ARCH]:
        out.append(_r(f"architectures {archs}, not [{ARCH!r}]", "config.json: architectures", "arch"))
    return out


def _model_shape(config: dict) -> list[Reason]:
    out = []
    n, start = int(config["num_hidden_layers"]), int(config.get("moe_layer_start_index", 0))
    if config.get("moe_layer_interval", 1) != 1 or config.get("moe_layer_end_index", -1) not in (-1, n - 1):
        out.append(_r(f"moe_layer_interval {config.get('moe_layer_interval', 1)}, moe_layer_end_index "
                      f"{config.get('moe_layer_end_index', -1)}: the model's MoE layers differ from FastDeploy's "
                      f"(layers {start}..{n - 1})", "config.json", "moe_layers"))
    for key in ("hidden_size", "moe_intermediate_size"):
        k = int(config.get(key) or 0)
        if k % fd.SCALE_ROW_INPUTS:
            out.append(_r(f"{key}={k} is not a multiple of 128: K // 128 local-scale rows drop the last 64-input group",
                          f"config.json: {key}", "code2"))
    return out


def _layer(name: str) -> int | None:
    m = re.match(r"^\w+\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def _tensors(view: CheckpointView, expected) -> list[Reason]:
    present = view.tensors
    hf_names = sorted(n for n in present if n.startswith("model."))
    if hf_names:
        return [_r(f"{len(hf_names)} tensors use the model. prefix (e.g. {hf_names[0]})", "tensor names", "names")]
    out = []
    w4_end = fd.w4_end_layer(view.qconfig)
    coded = sorted({_layer(n) for n in present if n.endswith(".super_scales") and ".mlp.experts." in n} - {None})
    experts = {_layer(n) for n in present if re.search(r"\.mlp\.experts\.\d+\.up_gate_proj\.quant_weight$", n)}
    wint4 = sorted(experts - set(coded) - {None})
    misrouted = [i for i in coded if i <= w4_end] + [i for i in wint4 if i > w4_end]
    for layers, held, goes in (([i for i in coded if i <= w4_end], "the 2-bit code", "wint4"),
                               ([i for i in wint4 if i > w4_end], "wint4 experts", "the 2-bit code")):
        if layers:
            out.append(_r(f"MoE layers {layers} hold {held}, but moe_w4_quant_end_layer={w4_end} dispatches them to "
                          f"{goes}", "quantization_config.moe_quant_config.moe_w4_quant_config", "dispatch"))
    problems: dict[tuple[str, str, str], list[str]] = {}  # (kind, fact, name pattern) -> examples
    for spec, key in expected:
        if ".mlp.experts." in spec.name and _layer(spec.name) in misrouted:
            continue  # already reported as one dispatch reason
        got, pattern = present.get(spec.name), re.sub(r"\.\d+\.", ".#.", spec.name)
        if got is None:
            problems.setdefault((*_missing_kind(spec.name, present, key), pattern), []).append(spec.name)
        elif got[0] != spec.dtype or tuple(got[1]) != tuple(spec.shape):
            what = f"{spec.name}: {_fmt(got)} where FastDeploy declares {_fmt((spec.dtype, spec.shape))}"
            problems.setdefault(("mismatch", key, pattern), []).append(what)
    if view.config.get("moe_use_aux_free") is not True:
        biases = sorted(n for n in present if n.endswith("moe_statics.e_score_correction_bias"))
        if biases:
            out.append(_r(f"{len(biases)} routing biases but moe_use_aux_free is not true: they would be dropped",
                          "config.json: moe_use_aux_free", "bias"))
    for (kind, key, _), items in problems.items():
        more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
        what = f"missing tensor {items[0]}{more}" if kind != "mismatch" else f"{items[0]}{more}"
        out.append(_r(what, items[0].split(":")[0], key))
    return out


def _missing_kind(name: str, present: dict, key: str) -> tuple[str, str]:
    """Name the rule a missing tensor breaks: unfused members present, bf16 / compressed-tensors leaves
    where FastDeploy reads quant_weight, or the plain layout fact."""
    stem, _, leaf = name.rpartition(".")
    for fused, first in (("qkv_proj", "q_proj"), ("up_gate_proj", "gate_proj")):
        if stem.endswith(fused) and any(n.startswith(stem[: -len(fused)] + first + ".") for n in present):
            return "missing", "fused"
    if leaf in (fd.QUANT_WEIGHT, fd.WEIGHT_SCALE) and any(f"{stem}.{x}" in present for x in ("weight", "weight_packed")):
        return "missing", "is_quantized"
    return "missing", key


def _fmt(dtype_shape) -> str:
    dtype, shape = dtype_shape
    return f"{str(dtype).replace('torch.', '')} {list(shape)}"
