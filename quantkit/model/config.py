"""ERNIE-4.5-MoE configuration, read from a Hugging Face ``config.json``.

Only the keys the forward pass needs are kept; the original dict is carried along (``raw``) so that
writers can copy it back out unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError

SUPPORTED_ARCHITECTURES = ("Ernie4_5_MoeForCausalLM",)


@dataclass(frozen=True)
class ErnieMoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (layers before moe_layer_start_index)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    use_bias: bool = False
    moe_num_experts: int = 0
    moe_k: int = 0
    moe_num_shared_experts: int = 0
    moe_intermediate_size: int = 0
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1  # -1 = last layer
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise UsageError(
                f"config: num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise UsageError(f"config: head_dim must be even for RoPE, got {self.head_dim}")
        if self.moe_num_experts and not 0 < self.moe_k <= self.moe_num_experts:
            raise UsageError(f"config: moe_k={self.moe_k} must be in 1..moe_num_experts={self.moe_num_experts}")
        if self.moe_num_experts and self.moe_intermediate_size <= 0:
            raise UsageError("config: moe_intermediate_size must be positive for an MoE model")

    # -- layer kinds -------------------------------------------------------------------------
    def is_moe_layer(self, idx: int) -> bool:
        """Same rule as the reference implementation: interval, start and (inclusive) end index."""
        if not self.moe_num_experts:
            return False
        end = self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index
        return (idx + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= idx <= end

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # -- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ErnieMoeConfig":
        archs = d.get("architectures") or []
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and d.get("model_type") != "ernie4_5_moe":
            got = ", ".join(archs) or d.get("model_type") or "unknown"
            raise UsageError(
                f"unsupported architecture {got}: quantkit supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            rope = d.get("rope_parameters") or {}
            theta = rope.get("rope_theta", d.get("rope_theta", 500000.0))
            if rope.get("rope_type", "default") != "default":
                raise UsageError(f"config: rope_type {rope['rope_type']!r} is not supported (only 'default')")
            return cls(
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_hidden_layers=int(d["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                max_position_embeddings=int(d.get("max_position_embeddings", 131072)),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
                use_bias=bool(d.get("use_bias", False)),
                moe_num_experts=int(d.get("moe_num_experts") or 0),
                moe_k=int(d.get("moe_k") or 0),
                moe_num_shared_experts=int(d.get("moe_num_shared_experts") or 0),
                moe_intermediate_size=int(d.get("moe_intermediate_size") or 0),
                moe_layer_start_index=int(d.get("moe_layer_start_index", 1)),
                moe_layer_end_index=int(d.get("moe_layer_end_index", -1)),
                moe_layer_interval=int(d.get("moe_layer_interval", 1)),
                moe_norm_min=float(d.get("moe_norm_min", 1e-12)),
                bos_token_id=d.get("bos_token_id"),
                eos_token_id=d.get("eos_token_id"),
                pad_token_id=d.get("pad_token_id"),
                raw=dict(d),
            )
        except KeyError as e:
            raise UsageError(f"config.json lacks the required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise UsageError(f"config.json has an invalid value: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> "ErnieMoeConfig":
        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise UsageError(f"{path}: no config.json (not a Hugging Face model directory)")
        try:
            d = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UsageError(f"{cfg_path}: invalid JSON ({e})") from None
        if not isinstance(d, dict):
            raise UsageError(f"{cfg_path}: expected a JSON object")
        return cls.from_dict(d)
