"""Swap quantized modules into a meta-device skeleton, driven by the checkpoint's ``quantization_config``."""

from __future__ import annotations

from torch import nn

from quantkit.errors import QuantkitError
from quantkit.format import trellis as trellis_fmt
from quantkit.format import wint2
from quantkit.format.compressed_tensors import SCALE, expert_prefixes, scheme_for
from quantkit.model.config import MoeConfig
from quantkit.model.safetensors_io import CheckpointReader
from quantkit.nn.quantized import CODE2, QuantExperts, QuantLinear
from quantkit.nn.trellis import TRELLIS
from quantkit.quant.config import candidate_modules


def _scheme(qconfig: dict, reader: CheckpointReader, prefix: str, k: int):
    """(bits, group_size, symmetric, scale dtype) of the on-disk linear ``prefix``, or None."""
    s = scheme_for(qconfig, prefix)
    if s is None or f"{prefix}.{SCALE}" not in reader:
        return None
    bits, sym = s
    groups = reader.info(f"{prefix}.{SCALE}").shape[-1]
    if k % groups:
        raise QuantkitError(f"{prefix}: {groups} scale groups do not divide K={k}")
    return bits, k // groups, sym, reader.info(f"{prefix}.{SCALE}").dtype


def swap_quantized_modules(model: nn.Module, cfg: MoeConfig, qconfig: dict, reader: CheckpointReader) -> int:
    """Replace every linear / expert projection that the checkpoint stores quantized. Returns how many."""
    swapped = 0
    expert_schemes: dict[str, dict[str, tuple | str]] = {}  # "model.layers.L.mlp" -> {proj: (bits, group, sym) | CODE2}
    scale_dtypes: dict[str, object] = {}
    code2 = qconfig.get(wint2.CONFIG_KEY) or {}
    code2_modules = set(code2.get("modules", []))
    fused = code2.get("layout") == "fastdeploy-fused-up-gate"
    if code2 and code2.get("scheme") != wint2.SCHEME:
        raise QuantkitError(f"unknown 2-bit code scheme {code2.get('scheme')!r} (quantkit reads {wint2.SCHEME!r})")
    trellis = qconfig.get(trellis_fmt.CONFIG_KEY) or {}
    if trellis and (trellis.get("scheme"), trellis.get("format_version")) != (trellis_fmt.SCHEME, trellis_fmt.FORMAT_VERSION):
        raise QuantkitError(f"unknown trellis scheme {trellis.get('scheme')!r} v{trellis.get('format_version')} "
                            f"(quantkit reads {trellis_fmt.SCHEME!r} v{trellis_fmt.FORMAT_VERSION})")
    trellis_modules = trellis.get("modules", {})
    for name, shape in candidate_modules(cfg):
        if name in trellis_modules:  # routed experts in the trellis code
            mlp, _, leaf = name.rpartition(".experts.")
            m = trellis_modules[name]
            expert_schemes.setdefault(mlp, {})[leaf] = (TRELLIS, int(m["bits"]), int(m["state_bits"]))
            scale_dtypes.setdefault(mlp, trellis_fmt.SCALE_DTYPE)
            swapped += 1
            continue
        if name in code2_modules:  # routed experts in the 2-bit code
            mlp, _, leaf = name.rpartition(".experts.")
            expert_schemes.setdefault(mlp, {})[leaf] = CODE2
            scale_dtypes.setdefault(mlp, wint2.SUPER_DTYPE)
            swapped += 1
            continue
        prefixes = expert_prefixes(name, cfg.moe_num_experts if len(shape) == 3 else 0, cfg.spec)
        schemes = {_scheme(qconfig, reader, p, shape[-1]) for p in prefixes}
        if schemes == {None}:
            continue
        if len(schemes) > 1:
            raise QuantkitError(f"{name}: members of one weight are stored with different schemes")
        bits, group, sym, sdtype = schemes.pop()
        parent_name, _, leaf = name.rpartition(".")
        if len(shape) == 3:  # parent_name = model.layers.L.mlp.experts
            mlp = parent_name.rpartition(".")[0]
            expert_schemes.setdefault(mlp, {})[leaf] = (bits, group, sym)
            scale_dtypes[mlp] = sdtype
        else:
            parent = model.get_submodule(parent_name)
            bias = getattr(parent, leaf).bias is not None
            setattr(parent, leaf, QuantLinear(shape[1], shape[0], bits, group, sym, sdtype, bias=bias))
        swapped += 1
    for mlp, schemes in expert_schemes.items():
        fuse = fused and schemes.get("gate_proj") == CODE2
        if fuse and schemes.get("up_proj") != CODE2:
            raise QuantkitError(f"{mlp}: a fused up_gate_proj needs gate_proj and up_proj both in the 2-bit code")
        try:
            model.get_submodule(mlp).experts = QuantExperts(
                cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size, schemes, scale_dtypes[mlp], fused_up_gate=fuse)
        except ValueError as e:  # the 2-bit code's K check: a config that does not match the format
            raise QuantkitError(f"{mlp}: {e}") from None
    return swapped
