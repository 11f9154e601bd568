"""The on-disk format of integer checkpoints: compressed-tensors ``pack-quantized`` (what vLLM loads).

This module owns every tensor name, dtype, packed shape and bit order; packer, writer, loader and the
quantized modules import from here.

Per quantized linear ``P`` (``[N, K]``), named by the family's Hub name (``arch.spec.hub_prefixes``: routed experts
per expert, ``model.layers.L.mlp.experts.{e}.{gate,up,down}_proj``, Mixtral ``block_sparse_moe.experts.{e}.w1``...):
    P.weight_packed      int32 [N, ceil(K*b/32)]   codes + 2^(b-1) as unsigned b-bit fields, packed
                                                   densely along K: element k occupies bits k*b .. k*b+b-1
                                                   of the little-endian bit stream of the row (LSB of
                                                   word 0 first); a field may straddle two words.
    P.weight_scale       model dtype [N, K/g]      (per-channel: [N, 1])
    P.weight_zero_point  int32 [ceil(N*b/32), K/g] asymmetric only: signed zero points + 2^(b-1),
                                                   packed the same way along N (column-wise)
    P.weight_shape       int64 [2]                 (N, K)
Unquantized tensors keep their Hub names and dtypes.

The Triton kernels (``quantkit/kernels``) read these tensors as they are, with no load-time repack. A weight
tile is ``[BN rows, BK/(32/b) words]`` of ``weight_packed``; it is unpacked in registers by shifting along a
new last axis, and a row-major reshape puts element k of word w at w*(32/b)+k. Zero points come from the word
of row n, ``n // (32/b)``. So the checkpoint on disk, the buffers in memory and the kernels share one layout.
3-bit fields straddle words, and those weights keep the torch path.

config.json gains ``quantization_config`` (quant_method compressed-tensors, format pack-quantized,
config_groups with ``re:`` targets, ignore); quantkit's own metadata (format version, recipe, tool
version, per-shard sha256, the plan) goes to ``quantkit.json`` beside it.
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

from quantkit.format.writer import TensorSpec
from quantkit.model.arch.spec import ArchSpec, always_ignored, hub_prefixes, hub_regex
from quantkit.quant.config import Plan
from quantkit.quant.qtensor import QTensor

FORMAT_NAME = "compressed-tensors/pack-quantized"
FORMAT_VERSION = 1
METADATA_FILE = "quantkit.json"
PACKED, SCALE, ZERO, SHAPE = "weight_packed", "weight_scale", "weight_zero_point", "weight_shape"


# -- bit packing ------------------------------------------------------------------------------------

def packed_words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes [..., K] (int8, in the b-bit range) -> int32 [..., ceil(K*b/32)], dense LSB-first stream."""
    *lead, k = codes.shape
    u = (codes.to(torch.int64) + (1 << (bits - 1)))
    if bool(((u < 0) | (u >= (1 << bits))).any()):
        raise ValueError(f"codes out of the {bits}-bit range")
    if 32 % bits == 0:  # fields never straddle words: shift each into place (same stream, less memory)
        per = 32 // bits
        u = torch.nn.functional.pad(u, (0, packed_words(k, bits) * per - k)).reshape(*lead, -1, per)
        value = (u << (torch.arange(per, dtype=torch.int64, device=codes.device) * bits)).sum(-1)
        return torch.where(value >= (1 << 31), value - (1 << 32), value).to(torch.int32)
    bit_pos = torch.arange(bits, dtype=torch.int64, device=codes.device)
    stream = ((u[..., None] >> bit_pos) & 1).reshape(*lead, k * bits)  # bit i*b+j = bit j of element i
    words = packed_words(k, bits)
    stream = torch.nn.functional.pad(stream, (0, words * 32 - k * bits)).reshape(*lead, words, 32)
    value = (stream << torch.arange(32, dtype=torch.int64, device=codes.device)).sum(-1)  # unsigned 32-bit
    return torch.where(value >= (1 << 31), value - (1 << 32), value).to(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of ``pack_rows``: int32 [..., words] -> signed int8 codes [..., K]."""
    *lead, words = packed.shape
    if words != packed_words(k, bits):
        raise ValueError(f"{words} packed words cannot hold K={k} {bits}-bit values")
    if 32 % bits == 0:  # fields never straddle words
        per = 32 // bits
        shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
        u = (packed[..., None] >> shifts) & ((1 << bits) - 1)  # arithmetic shift, then mask: unsigned field
        return (u.reshape(*lead, words * per)[..., :k] - (1 << (bits - 1))).to(torch.int8)
    v = packed.to(torch.int64) & 0xFFFFFFFF
    stream = ((v[..., None] >> torch.arange(32, dtype=torch.int64, device=packed.device)) & 1).reshape(*lead, words * 32)
    fields = stream[..., : k * bits].reshape(*lead, k, bits)
    u = (fields << torch.arange(bits, dtype=torch.int64, device=packed.device)).sum(-1)
    return (u - (1 << (bits - 1))).to(torch.int8)


# -- one linear's tensors ---------------------------------------------------------------------------

def linear_specs(prefix: str, n: int, k: int, bits: int, group_size: int, symmetric: bool,
                 scale_dtype: torch.dtype) -> list[TensorSpec]:
    """Names, dtypes and shapes ``linear_tensors`` will produce for an [N, K] weight (in the same order)."""
    specs = [TensorSpec(f"{prefix}.{PACKED}", torch.int32, (n, packed_words(k, bits))),
             TensorSpec(f"{prefix}.{SCALE}", scale_dtype, (n, k // group_size)),
             TensorSpec(f"{prefix}.{SHAPE}", torch.int64, (2,))]
    if not symmetric:
        specs.append(TensorSpec(f"{prefix}.{ZERO}", torch.int32, (packed_words(n, bits), k // group_size)))
    return specs


def linear_tensors(prefix: str, qt: QTensor) -> dict[str, torch.Tensor]:
    """On-disk tensors for one 2-D QTensor named ``prefix`` (e.g. ``model.layers.0.self_attn.q_proj``)."""
    n, k = qt.shape
    t = {f"{prefix}.{PACKED}": pack_rows(qt.codes, qt.bits), f"{prefix}.{SCALE}": qt.scales.contiguous(),
         f"{prefix}.{SHAPE}": torch.tensor([n, k], dtype=torch.int64)}
    if qt.zeros is not None:
        t[f"{prefix}.{ZERO}"] = pack_rows(qt.zeros.t(), qt.bits).t().contiguous()
    return t


def module_tensors(module: str, qt: QTensor, spec: ArchSpec) -> dict[str, torch.Tensor]:
    """On-disk tensors for a planned module (canonical name), under the family's Hub names; 3-D routed experts
    are split into one linear per expert."""
    prefixes = expert_prefixes(module, qt.codes.shape[0] if qt.codes.dim() == 3 else 0, spec)
    if qt.codes.dim() == 2:
        return linear_tensors(prefixes[0], qt)
    out = {}
    for e, prefix in enumerate(prefixes):
        out.update(linear_tensors(prefix, qt.select(e)))
    return out


def expert_prefixes(module: str, num_experts: int, spec: ArchSpec) -> list[str]:
    """Disk prefixes of a canonical module: its Hub name, or one per expert for 3-D routed experts."""
    return hub_prefixes(spec, module, num_experts)


def read_qtensor(read, prefix: str, bits: int, symmetric: bool) -> QTensor:
    """Rebuild one linear's QTensor from its on-disk tensors (``read(name) -> tensor``)."""
    n, k = (int(x) for x in read(f"{prefix}.{SHAPE}").tolist())
    codes = unpack_rows(read(f"{prefix}.{PACKED}"), bits, k)
    scales = read(f"{prefix}.{SCALE}")
    zeros = None if symmetric else unpack_rows(read(f"{prefix}.{ZERO}").t().contiguous(), bits, n).t().contiguous()
    return QTensor(codes, scales, zeros, bits, k // scales.shape[-1])


# -- config.json ----------------------------------------------------------------------------------

def _weights_args(bits: int, symmetric: bool, channel: bool, group_size: int) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric,
            "strategy": "channel" if channel else "group", "group_size": None if channel else group_size,
            "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None}


def _role_regex(module: str, spec: ArchSpec) -> str:
    """``model.layers.3.mlp.experts.down_proj`` -> a regex for that module's on-disk linears (one per expert)."""
    return hub_regex(spec, module)


def quantization_config(plan: Plan, spec: ArchSpec) -> dict:
    """The ``quantization_config`` block: one config group per distinct (rule, effective group);
    ``ignore`` lists the router, the LM head, the family's never-quantized linears (``arch.spec.always_ignored``),
    every candidate the recipe left unquantized and the modules in the 2-bit code (``format/wint2.py``;
    described by its own key, not by compressed-tensors). Targets are Hub names; a family's ``ct_class_target``
    linears add the class target ``Linear`` to their group when they all share one."""
    ignore = always_ignored(spec) + [_role_regex(m, spec) for m in plan.unquantized]
    groups: dict[tuple, list[str]] = defaultdict(list)
    for e in plan.entries:
        if e.rule.format != "int":
            if _role_regex(e.module, spec) not in ignore:
                ignore.append(_role_regex(e.module, spec))
            continue
        key = (e.rule.bits, e.rule.symmetric, e.rule.group_size is None, e.group_size)
        groups[key].append(e.module)
    config_groups = {}
    flagged = [k for k, modules in groups.items() if spec.ct_class_target and
               any(re.search(r"^model\.layers\.\d+\.(?:" + spec.ct_class_target + ")", m) for m in modules)]
    for i, (key, modules) in enumerate(sorted(groups.items(), key=lambda kv: kv[0])):
        bits, sym, channel, g = key
        # the class target reaches what names cannot; names win over it in every reader (vLLM, compressed-tensors)
        extra = ["Linear"] if flagged == [key] else []
        config_groups[f"group_{i}"] = {
            "targets": [_role_regex(m, spec) for m in modules] + extra,
            "weights": _weights_args(bits, sym, channel, g),
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None}


def scheme_for(qconfig: dict, disk_name: str) -> tuple[int, bool] | None:
    """(bits, symmetric) for an on-disk linear name per ``quantization_config``; None if not quantized.

    Works for checkpoints from other compressed-tensors writers too: targets may be class names
    (``Linear`` matches every linear) or ``re:`` regexes (matched with ``re.match``).
    """
    for pat in qconfig.get("ignore") or []:
        if (pat.startswith("re:") and re.match(pat[3:], disk_name)) or pat == disk_name:
            return None
    groups = list((qconfig.get("config_groups") or {}).values())
    by_name = [g for g in groups if any((t.startswith("re:") and re.match(t[3:], disk_name)) or t == disk_name
                                        for t in g.get("targets", []))]
    # a name or regex wins over a class target, in whichever group it is (as vLLM's find_matched_target)
    for group in by_name or [g for g in groups if "Linear" in g.get("targets", [])]:
        w = group["weights"]
        if w.get("type", "int") != "int":
            raise ValueError(f"{disk_name}: weight type {w.get('type')} is not an integer format")
        return int(w["num_bits"]), bool(w.get("symmetric", True))
    return None
