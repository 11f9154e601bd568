"""``quantkit inspect``: what a checkpoint holds, read from its config and safetensors headers only."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

from quantkit.format import compressed_tensors as fmt
from quantkit.format import trellis
from quantkit.format import wint2
from quantkit.model.config import MoeConfig
from quantkit.model.safetensors_io import CheckpointReader
from quantkit.sources import resolve

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:\w+\.)*experts\.(\d+)\.")  # mlp.experts, block_sparse_moe.experts


def _role(name: str) -> str:
    """``model.layers.3.mlp.experts.7.up_proj.weight_packed`` -> ``mlp.experts.*.up_proj``."""
    name = re.sub(r"\.(weight|weight_packed|weight_scale|weight_zero_point|weight_shape|e_score_correction_bias|"
                  r"quant_weight|super_scales|code_scale|code_zp|trellis|suh|svh)$", "", name)
    name = re.sub(r"^model\.layers\.\d+\.", "", name)
    return re.sub(r"\.experts\.\d+\.", ".experts.*.", name)


def inspect_checkpoint(src: str) -> dict:
    path = resolve(src)
    cfg = MoeConfig.from_dir(path)
    reader = CheckpointReader(path)
    qconfig = cfg.raw.get("quantization_config")
    meta_file = path / fmt.METADATA_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    experts_per_layer = defaultdict(set)
    roles: dict[str, Counter] = defaultdict(Counter)
    unquantized: Counter = Counter()
    parts: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # scheme -> [bytes, weights]
    code2 = (qconfig or {}).get(wint2.CONFIG_KEY)
    tr = (qconfig or {}).get(trellis.CONFIG_KEY)
    weights = 0
    for name in reader.names():
        m = _EXPERT.match(name)
        if m:
            experts_per_layer[int(m.group(1))].add(int(m.group(2)))
        info = reader.info(name)
        if tr and name.endswith(f".{trellis.TRELLIS}"):
            prefix = name[: -len(trellis.TRELLIS) - 1]
            i, j, words = info.shape
            module = re.sub(r"\.experts\.\d+\.", ".experts.", prefix)
            L = tr["modules"].get(module, {}).get("state_bits", "?")
            scheme = f"{trellis.SCHEME} {words * 32 // trellis.T}-bit L{L} (QTIP/EXL3-class, MUL1, Hadamard)"
            roles[_role(name)][scheme] += 1
            parts[scheme][0] += sum(reader.info(f"{prefix}.{leaf}").nbytes for leaf in trellis.LEAVES)
            parts[scheme][1] += i * j * trellis.T
            weights += i * j * trellis.T
        elif tr and name.endswith(tuple(f".{leaf}" for leaf in trellis.LEAVES[1:])) and \
                f"{name.rsplit('.', 1)[0]}.{trellis.TRELLIS}" in reader:
            continue
        elif code2 and name.endswith(f".{wint2.QUANT_WEIGHT}"):
            prefix = name[: -len(wint2.QUANT_WEIGHT) - 1]
            r, n = info.shape
            scheme = f"{wint2.SCHEME} 2-bit code g{wint2.GROUP}"
            roles[_role(name)][scheme] += 1
            parts[scheme][0] += sum(reader.info(f"{prefix}.{leaf}").nbytes for leaf in wint2.LEAVES)
            parts[scheme][1] += r * wint2.PACK * n
            weights += r * wint2.PACK * n
        elif code2 and name.endswith(tuple(f".{leaf}" for leaf in wint2.LEAVES[1:])) and \
                f"{name.rsplit('.', 1)[0]}.{wint2.QUANT_WEIGHT}" in reader:
            continue
        elif name.endswith(fmt.PACKED):
            prefix = name[: -len(fmt.PACKED) - 1]
            n, k = reader.read(f"{prefix}.{fmt.SHAPE}").tolist()
            bits, sym = fmt.scheme_for(qconfig or {}, prefix) or (None, None)
            groups = reader.info(f"{prefix}.{fmt.SCALE}").shape[-1]
            scheme = f"int{bits} g{k // groups} {'sym' if sym else 'asym'}"
            roles[_role(name)][scheme] += 1
            parts[scheme][0] += sum(reader.info(f"{prefix}.{leaf}").nbytes for leaf in (fmt.PACKED, fmt.SCALE, fmt.ZERO, fmt.SHAPE)
                                    if f"{prefix}.{leaf}" in reader)
            parts[scheme][1] += n * k
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
        "architecture": f"{cfg.spec.architectures[0]} ({cfg.spec.name})",
        "layers": cfg.num_hidden_layers,
        "experts_per_layer": {str(k): len(v) for k, v in sorted(experts_per_layer.items())},
        "quantized": {role: dict(c) for role, c in sorted(roles.items())},
        "unquantized": dict(sorted(unquantized.items())),
        "fallbacks": [r for r in meta.get("plan", []) if r.get("note")],
        "weights": weights,
        "tensor_bytes": size,
        "bits_per_weight": 8 * size / max(weights, 1),
        "bits_per_weight_parts": {k: {"bits_per_weight": 8 * b / max(w, 1), "weights": w} for k, (b, w) in sorted(parts.items())},
        "code2": code2,
        "trellis": tr,
    }


def format_inspect(r: dict) -> str:
    lines = [f"{r['path']}", f"  format: {r['format']}" + (f" v{r['format_version']}" if r["format_version"] else "")
             + (f" (quantkit {r['quantkit_version']}, recipe {r['recipe']})" if r["quantkit_version"] else ""),
             f"  size: {r['tensor_bytes'] / 1e9:.3f} GB for {r['weights'] / 1e9:.3f} B weights = {r['bits_per_weight']:.3f} bits/weight",
             f"  architecture: {r['architecture']}",
             f"  layers: {r['layers']}; routed experts per MoE layer: "
             + (", ".join(f"L{k}:{v}" for k, v in r["experts_per_layer"].items()) or "none")]
    if r.get("code2"):
        c = r["code2"]
        lines.append(f"  2-bit code: {c['scheme']} (convolutional code, FastDeploy WINT2 layout: uint8 codes per 4 inputs, "
                     f"4-bit local scale per {c['group_size']} inputs, bf16 super scale and fp32 code scale/zero point per "
                     f"column), {c['layout']}, routed experts of layers " + ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in c["layer_ranges"]))
    if r.get("trellis"):
        t = r["trellis"]
        lines.append(f"  trellis code: {t['scheme']} v{t['format_version']} (tail-biting bit-shift trellis over "
                     f"{t['tile']}x{t['tile']} tiles, {t['code']} values, block Hadamard <= {t['hadamard_max_block']} on both "
                     f"sides with {t['scale_dtype']} suh/svh; read by quantkit only) for {len(t['modules'])} expert modules")
    for scheme, p in r.get("bits_per_weight_parts", {}).items():
        lines.append(f"  {scheme}: {p['bits_per_weight']:.3f} bits/weight over {p['weights'] / 1e6:.2f} M weights (scales included)")
    if r["quantized"]:
        lines.append("  quantized (module role: scheme x count):")
        lines += [f"    {role}: " + ", ".join(f"{s} x{n}" for s, n in c.items()) for role, c in r["quantized"].items()]
    lines.append("  unquantized tensors (role (dtype): count):")
    lines += [f"    {k}: {v}" for k, v in r["unquantized"].items()]
    if r["fallbacks"]:
        lines.append(f"  plan notes (group-size fallbacks, export rules): {len(r['fallbacks'])} modules, e.g. {r['fallbacks'][0]['module']}: {r['fallbacks'][0]['note']}")
    return "\n".join(lines)
