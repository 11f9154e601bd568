"""The model configuration every family shares (``MoeConfig``), read from a Hugging Face ``config.json`` through
the family's ``ArchSpec`` (``quantkit.model.arch``): which Hub key feeds which field, the family's defaults,
its fixed values and its required keys.

Only the keys the forward pass needs are kept; the original dict is carried along (``raw``) so that writers can
copy it back out unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from quantkit.errors import UsageError
from quantkit.model.arch.spec import QK_NORMS, ROPE_STYLES, ArchSpec
from quantkit.model.routers import SCORINGS, RouterSpec


@dataclass(frozen=True)
class MoeConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (the layers that are not MoE)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    arch: str = "ernie"  # ArchSpec.name
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_style: str = "interleaved"  # ROPE_STYLES
    partial_rotary_factor: float = 1.0  # the first int(head_dim * factor) dims of each head rotate (GLM: 0.5)
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    qkv_bias: bool = False  # q/k/v projections carry a bias
    o_bias: bool = False
    mlp_bias: bool = False  # dense MLP and shared experts (ERNIE's use_bias)
    qk_norm: str = "none"  # QK_NORMS
    moe_num_experts: int = 0
    moe_k: int = 0
    moe_num_shared_experts: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0  # > 0: the shared expert's width (Qwen2-MoE); else I * shared experts
    shared_expert_gate: bool = False  # Qwen2-MoE: shared output times sigmoid(mlp.shared_expert_gate(x)) ([1, H])
    # layer kinds: MoE where (idx + 1) % interval == 0, start <= idx <= end (-1: last), idx not in dense_layers
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1
    moe_layer_interval: int = 1
    dense_layers: tuple[int, ...] = ()
    moe_layer_freq: int = 1  # DeepSeek (vLLM's rule): MoE only where idx % moe_layer_freq == 0
    # router (``RouterSpec``)
    router_scoring: str = "softmax"
    norm_topk_prob: bool = True
    moe_norm_min: float = 1e-12
    router_bias: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
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
        if self.rotary_dim % 2 or self.rotary_dim <= 0:
            raise UsageError(f"config: the rotary dims (head_dim {self.head_dim} x partial_rotary_factor "
                             f"{self.partial_rotary_factor}) must be even and positive for RoPE")
        if self.rope_style not in ROPE_STYLES or self.qk_norm not in QK_NORMS or self.router_scoring not in SCORINGS:
            raise UsageError(f"config: rope_style {self.rope_style!r} / qk_norm {self.qk_norm!r} / router_scoring "
                             f"{self.router_scoring!r} not supported")
        if self.moe_num_experts and not 0 < self.moe_k <= self.moe_num_experts:
            raise UsageError(f"config: moe_k={self.moe_k} must be in 1..moe_num_experts={self.moe_num_experts}")
        if self.moe_num_experts and self.moe_intermediate_size <= 0:
            raise UsageError("config: moe_intermediate_size must be positive for an MoE model")
        if self.moe_num_experts:
            _ = self.router_spec  # validates the routing fields (n_group, topk_group)

    @property
    def spec(self) -> ArchSpec:
        from quantkit.model.arch import get_spec

        return get_spec(self.arch)

    @property
    def mla(self):
        """The ``MlaConfig`` of a multi-head-latent-attention family (DeepSeek-V3), read from the config.json dict."""
        from quantkit.model.mla import MlaConfig

        return MlaConfig.from_hf(self.raw)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def shared_width(self) -> int:
        """Width of the shared-experts MLP of an MoE layer (0: none)."""
        return self.shared_expert_intermediate_size or self.moe_intermediate_size * self.moe_num_shared_experts

    @property
    def router_spec(self) -> RouterSpec:
        return RouterSpec(top_k=self.moe_k, num_experts=self.moe_num_experts, scoring=self.router_scoring,
                          renormalize=self.norm_topk_prob, norm_min=self.moe_norm_min, has_bias=self.router_bias,
                          n_group=self.n_group, topk_group=self.topk_group,
                          routed_scaling_factor=self.routed_scaling_factor)

    # -- layer kinds -------------------------------------------------------------------------
    def is_moe_layer(self, idx: int) -> bool:
        """ERNIE's interval/start/(inclusive) end rule, GLM's first_k_dense_replace (= start), Qwen's
        decoder_sparse_step (= interval) and mlp_only_layers (= dense_layers)."""
        if not self.moe_num_experts or idx in self.dense_layers:
            return False
        end = self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index
        return ((idx + 1) % self.moe_layer_interval == 0 and self.moe_layer_start_index <= idx <= end
                and idx % self.moe_layer_freq == 0)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    # -- (de)serialisation -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoeConfig:
        from quantkit.model.arch import spec_for_config

        spec = spec_for_config(d)
        for key in spec.required:
            if _get(d, key) is None:
                raise UsageError(f"config.json ({spec.name}) lacks the required key {key.split('|')[0]!r}")
        for key, only in spec.unsupported:
            if d.get(key, only) != only:
                raise UsageError(f"config.json ({spec.name}): {key}={d[key]!r} is not supported (only {only!r})")
        rope = d.get("rope_parameters") or {}
        legacy = d.get("rope_scaling") or {}  # Hub configs written before transformers 5
        for r in (rope, legacy):
            kind = r.get("rope_type", r.get("type", "default"))
            if kind not in spec.rope_types:
                raise UsageError(f"config: rope_type {kind!r} is not supported (only "
                                 f"{', '.join(map(repr, spec.rope_types))})")
        keys, defaults = dict(spec.config_keys), dict(spec.defaults)
        try:
            hidden, heads = int(d["hidden_size"]), int(d["num_attention_heads"])
            derived = {"head_dim": d.get("head_dim") or hidden // heads,
                       "num_key_value_heads": d.get("num_key_value_heads") or heads,
                       "rope_theta": rope.get("rope_theta", d.get("rope_theta")),
                       "partial_rotary_factor": rope.get("partial_rotary_factor", d.get("partial_rotary_factor"))}
            values: dict[str, Any] = {"arch": spec.name, "raw": dict(d)}
            for f in fields(cls):
                if f.name in ("arch", "raw"):
                    continue
                v = derived[f.name] if f.name in derived and f.name not in keys else _get(d, keys.get(f.name, f.name))
                if v is None:
                    v = defaults.get(f.name)
                if v is not None or f.name.endswith("_token_id"):
                    values[f.name] = _convert(f.name, v)
            values.update(spec.fixed)
            cfg = cls(**values)
            if spec.attention == "mla":
                _ = cfg.mla  # validates the latent-attention keys and the rope scaling now, not at build time
            return cfg
        except KeyError as e:
            raise UsageError(f"config.json lacks the required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise UsageError(f"config.json has an invalid value: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> MoeConfig:
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


_FLOATS = {"rms_norm_eps", "rope_theta", "partial_rotary_factor", "moe_norm_min", "routed_scaling_factor"}
_STRS = {"rope_style", "qk_norm", "router_scoring"}
_BOOLS = {"tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "shared_expert_gate", "norm_topk_prob", "router_bias"}


def _get(d: dict, key: str) -> Any:
    """``d[key]``, where ``key`` may list alternatives ``a|b`` (the first present and not None wins)."""
    return next((d[k] for k in key.split("|") if d.get(k) is not None), None)


def _convert(name: str, v: Any) -> Any:
    """A config.json value -> the field's type (token ids pass through: an int, a list or None)."""
    if name.endswith("_token_id"):
        return v
    if name == "dense_layers":
        return tuple(int(i) for i in v)
    if name in _FLOATS:
        return float(v)
    if name == "qk_norm" and isinstance(v, bool):  # a boolean key (GLM's use_qk_norm) means per-head q/k norm
        return "head" if v else "none"
    if name in _STRS:
        return str(v)
    if name in _BOOLS:
        return bool(v)
    return int(v)


ErnieMoeConfig = MoeConfig  # the name before the architecture specs (issue 14); ERNIE is one spec among others
