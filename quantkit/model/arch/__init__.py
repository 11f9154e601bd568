"""The registry of MoE families (one small ``ArchSpec`` per file) and the lookup from a config.json."""

from __future__ import annotations

from quantkit.errors import UsageError
from quantkit.model.arch import (
    deepseek_v2,
    deepseek_v3,
    ernie,
    glm4_moe,
    mixtral,
    olmoe,
    qwen2_moe,
    qwen3_moe,
)
from quantkit.model.arch.spec import ArchSpec

SPECS: dict[str, ArchSpec] = {m.SPEC.name: m.SPEC for m in (ernie, qwen3_moe, qwen2_moe, mixtral, olmoe, glm4_moe,
                                                            deepseek_v3, deepseek_v2)}


def supported() -> str:
    return ", ".join(a for s in SPECS.values() for a in s.architectures)


def get_spec(name: str) -> ArchSpec:
    if name not in SPECS:
        raise UsageError(f"unknown architecture {name!r}: quantkit supports {supported()}")
    return SPECS[name]


def spec_for_config(d: dict) -> ArchSpec:
    """The family a config.json belongs to, by ``architectures`` and then ``model_type``."""
    archs = d.get("architectures") or []
    for s in SPECS.values():
        if any(a in s.architectures for a in archs):
            return s
    for s in SPECS.values():
        if d.get("model_type") == s.model_type:
            return s
    got = ", ".join(archs) or d.get("model_type") or "unknown"
    raise UsageError(f"unsupported architecture {got}: quantkit supports {supported()}")
