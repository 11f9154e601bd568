"""``quantkit inspect``: what a checkpoint holds, read from its config and safetensors headers only."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from quantkit.format import compressed_tensors as fmt
from quantkit.model.config import ErnieMoeConfig
from quantkit.model.safetensors_io import CheckpointReader
from quantkit.sources import resolve

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def _role(name: str) -> str:
    """``model.layers.3.mlp.experts.7.up_proj.weight_packed`` -> ``mlp.experts.*.up_proj``."""
    name = re.sub(r"\.(weight|weight_packed|weight_scale|weight_zero_point|weight_shape|e_score_correction_bias)$", "", name)
    name = re.sub(r"^model\.layers\.\d+\.", "", name)
    return re.sub(r"\.experts\.\d+\.", ".experts.*.", name)


def inspect_checkpoint(src: str) -> dict:
    path = resolve(src)
    cfg = ErnieMoeConfig.from_dir(path)
    reader = CheckpointReader(path)
    qconfig = cfg.raw.get("quantization_config")
    meta_file = path / fmt.METADATA_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    experts_per_layer = defaultdict(set)
    roles: dict[str, Counter] = defaultdict(Counter)
    unquantized: Counter = Counter()
    weights = 0
    for name in reader.names():
        m = _EXPERT.match(name)
        if m:
            experts_per_layer[int(m.group(1))].add(int(m.group(2)))
        info = reader.info(name)
        if name.endswith(fmt.PACKED):
            prefix = name[: -len(fmt.PACKED) - 1]
            n, k = reader.read(f"{prefix}.{fmt.SHAPE}").tolist()
            bits, sym = fmt.scheme_for(qconfig or {}, prefix) or (None, None)
            groups = reader.info(f"{prefix}.{fmt.SCALE}").shape[-1]
            roles[_role(name)][f"int{bits} g{k // groups} {'sym' if sym else 'asym'}"] += 1
            weights += n * k
        elif not name.endswith((fmt.SCALE, fmt.ZERO, fmt.SHAPE)):
            unquantized[f"{_role(name)} ({str(info.dtype).replace('torch.', '')})"] += 1
            n = 1
            for d in info.shape:
                n *= d
            weights += n
    size = sum(i.nbytes for i in reader.infos.values())
    return {
        "path": str(path),
        "format": meta.get("format") or ("compressed-tensors/" + qconfig.get("format", "?") if qconfig else "unquantized (HF)"),
        "format_version": meta.get("format_version"),
        "quantkit_version": meta.get("quantkit_version"),
        "recipe": (meta.get("recipe") or {}).get("name"),
        "layers": cfg.num_hidden_layers,
        "experts_per_layer": {str(k): len(v) for k, v in sorted(experts_per_layer.items())},
        "quantized": {role: dict(c) for role, c in sorted(roles.items())},
        "unquantized": dict(sorted(unquantized.items())),
        "fallbacks": [r for r in meta.get("plan", []) if r.get("note")],
        "weights": weights,
        "tensor_bytes": size,
        "bits_per_weight": 8 * size / max(weights, 1),
    }


def format_inspect(r: dict) -> str:
    lines = [f"{r['path']}", f"  format: {r['format']}" + (f" v{r['format_version']}" if r["format_version"] else "")
             + (f" (quantkit {r['quantkit_version']}, recipe {r['recipe']})" if r["quantkit_version"] else ""),
             f"  size: {r['tensor_bytes'] / 1e9:.3f} GB for {r['weights'] / 1e9:.3f} B weights = {r['bits_per_weight']:.3f} bits/weight",
             f"  layers: {r['layers']}; routed experts per MoE layer: "
             + (", ".join(f"L{k}:{v}" for k, v in r["experts_per_layer"].items()) or "none")]
    if r["quantized"]:
        lines.append("  quantized (module role: scheme x count):")
        lines += [f"    {role}: " + ", ".join(f"{s} x{n}" for s, n in c.items()) for role, c in r["quantized"].items()]
    lines.append("  unquantized tensors (role (dtype): count):")
    lines += [f"    {k}: {v}" for k, v in r["unquantized"].items()]
    if r["fallbacks"]:
        lines.append(f"  group-size fallbacks: {len(r['fallbacks'])} modules, e.g. {r['fallbacks'][0]['module']}: {r['fallbacks'][0]['note']}")
    return "\n".join(lines)
