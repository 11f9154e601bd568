"""Multi-head latent attention (DeepSeek-V2 / V3, Kimi-K2): low-rank q and kv projections, split rope dims.

    q        = q_b_proj(RMSNorm(q_a_proj(h)))            (or q_proj(h) when q_lora_rank is None)  [B, heads, T, nope+rope]
    latent, k_rot = kv_a_proj_with_mqa(h)                  [kv_lora_rank] and one shared rope key [rope]
    k_nope, v = kv_b_proj(RMSNorm(latent))                 per head [nope] and [v_head_dim]
    q_rot, k_rot rotated (rotate-half over the rope dims; ``rope_interleave``: the weights hold the rope dims in
    interleaved pairs, de-interleaved first, as transformers' ``apply_rotary_pos_emb_interleave``)
    out = o_proj(softmax(q k^T * scale) v),  k = [k_nope, k_rot broadcast to every head]

Parameter names are the Hub checkpoint's (``self_attn.q_a_proj`` ...). ``scale`` is ``(nope+rope)^-0.5``, times
``mscale(factor, mscale_all_dim)^2`` under yarn RoPE (DeepSeek's long-context scaling), whose cos/sin carry the
yarn attention factor; both are computed here exactly as transformers 5.24 does (``_compute_yarn_parameters``,
``yarn_apply_mscale``), so yarn checkpoints (DeepSeek-V3's ``factor`` 40) are supported, not refused.

The cache holds the expanded per-head keys ``[B, heads, T, nope+rope]`` and values ``[B, heads, T, v_head_dim]``
in quantkit's ``KVCache`` (concatenated along T), so it needs nothing MLA-specific; caching the latent
(``kv_lora_rank + rope`` per token instead of ``heads * (nope+rope+v)``) is a memory optimisation left for later.
The math runs in torch; with ``backend`` 'triton' the norms and the rotation are the pointwise kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import UsageError
from quantkit.model.layers import KVCache, RMSNorm

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: the reference's default, not rms_norm_eps
ROPE_TYPES = ("default", "yarn")


@dataclass(frozen=True)
class Yarn:
    """YaRN RoPE scaling as DeepSeek's config gives it (``rope_scaling`` / ``rope_parameters``)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True

    def __post_init__(self):
        if self.factor <= 0 or self.original_max_position_embeddings <= 0:
            raise UsageError(f"yarn rope: factor {self.factor} and original_max_position_embeddings "
                             f"{self.original_max_position_embeddings} must be positive")


@dataclass(frozen=True)
class MlaConfig:
    hidden_size: int
    num_heads: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None
    rope_theta: float = 10000.0
    rope_interleave: bool = True
    attention_bias: bool = False
    yarn: Yarn | None = None

    def __post_init__(self):
        for f in ("hidden_size", "num_heads", "kv_lora_rank", "qk_rope_head_dim", "v_head_dim"):
            if getattr(self, f) <= 0:
                raise UsageError(f"MLA config: {f}={getattr(self, f)} must be positive")
        if self.qk_nope_head_dim < 0 or (self.q_lora_rank is not None and self.q_lora_rank <= 0):
            raise UsageError(f"MLA config: qk_nope_head_dim={self.qk_nope_head_dim} must be >= 0 and q_lora_rank="
                             f"{self.q_lora_rank} positive or null")
        if self.qk_rope_head_dim % 2:
            raise UsageError(f"MLA config: qk_rope_head_dim={self.qk_rope_head_dim} must be even")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @classmethod
    def from_hf(cls, cfg: dict) -> MlaConfig:
        """From a DeepSeek-V2/V3 ``config.json`` dict: the Hub's ``rope_scaling`` or transformers 5's
        ``rope_parameters``. A missing field or an unsupported RoPE type is one clear error."""
        need = ("hidden_size", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                "v_head_dim")
        missing = [k for k in need if cfg.get(k) is None]
        if missing:
            raise UsageError(f"MLA config: config.json lacks {', '.join(missing)}")
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise UsageError(f"MLA config: rope type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        yarn = None
        if rope_type == "yarn":
            if rope.get("original_max_position_embeddings") is None:
                raise UsageError("MLA config: yarn rope lacks original_max_position_embeddings")
            factor = rope.get("factor")
            if factor is None:  # transformers' fallback: the ratio of the context lengths
                factor = cfg["max_position_embeddings"] / rope["original_max_position_embeddings"]
            known = {f.name for f in fields(Yarn)}
            yarn = Yarn(**{k: v for k, v in rope.items() if k in known and v is not None} | {"factor": factor})
        return cls(hidden_size=cfg["hidden_size"], num_heads=cfg["num_attention_heads"],
                   kv_lora_rank=cfg["kv_lora_rank"], qk_nope_head_dim=cfg["qk_nope_head_dim"],
                   qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"],
                   q_lora_rank=cfg.get("q_lora_rank"), rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
                   rope_interleave=bool(cfg.get("rope_interleave", True)),
                   attention_bias=bool(cfg.get("attention_bias", False)), yarn=yarn)


def mla_linears(cfg: MlaConfig) -> list[tuple[str, tuple[int, int]]]:
    """(name under ``self_attn``, [N, K]) of every linear of the attention, in checkpoint order."""
    h, nh = cfg.hidden_size, cfg.num_heads
    q = ([("q_proj", (nh * cfg.qk_head_dim, h))] if cfg.q_lora_rank is None else
         [("q_a_proj", (cfg.q_lora_rank, h)), ("q_b_proj", (nh * cfg.qk_head_dim, cfg.q_lora_rank))])
    return q + [("kv_a_proj_with_mqa", (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)),
                ("kv_b_proj", (nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)),
                ("o_proj", (h, nh * cfg.v_head_dim))]


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg: MlaConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope/2] (fp32) and the factor cos/sin are multiplied by (1 without yarn)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
    y = cfg.yarn
    if y is None:
        return 1.0 / pos_freqs, 1.0
    attention_factor = y.attention_factor
    if attention_factor is None:
        attention_factor = (yarn_mscale(y.factor, y.mscale) / yarn_mscale(y.factor, y.mscale_all_dim)
                            if y.mscale and y.mscale_all_dim else yarn_mscale(y.factor))

    def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times the context
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # high frequencies keep their value, low ones are divided by the factor
    return (1.0 / (y.factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate, float(attention_factor)


def softmax_scale(cfg: MlaConfig) -> float:
    """(nope+rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under yarn when mscale_all_dim is set."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.yarn is not None and cfg.yarn.mscale_all_dim:
        m = yarn_mscale(cfg.yarn.factor, cfg.yarn.mscale_all_dim)
        scale = scale * m * m
    return scale


class MlaRotaryEmbedding(nn.Module):
    """cos/sin tables for the rope dims: rotate-half layout (frequencies concatenated), yarn-scaled if set."""

    def __init__(self, cfg: MlaConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (int) -> cos, sin [T, qk_rope_head_dim] fp32."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, scale: float) -> torch.Tensor:
    """q [B, heads, T, Dqk] at positions past..past+T-1 over k/v [B, heads, past+T, D]: each sees keys up to its own."""
    T = q.shape[2]
    if past == 0 or T == 1:  # a prompt: causal; one new token: it sees every key (no mask to build)
        return F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and T > 1, scale=scale)
    mask = torch.arange(past + T, device=q.device)[None, :] <= (past + torch.arange(T, device=q.device))[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class MultiHeadLatentAttention(nn.Module):
    backend = "torch"  # 'triton' (``dispatch.set_backend``): the RoPE kernel (rotate-half) on q_rot and k_rot

    def __init__(self, cfg: MlaConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        h, nh, b = cfg.hidden_size, cfg.num_heads, cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(h, nh * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, cfg.q_lora_rank, bias=b)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=b)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, h, bias=b)
        self.scale = softmax_scale(cfg)

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, heads, T, rope] -> rotate-half RoPE (after de-interleaving when ``rope_interleave``), x's dtype."""
        if self.cfg.rope_interleave:  # pairs (2i, 2i+1) -> (i, i + rope/2)
            x = x.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)
        if self.backend == "triton":
            from quantkit.kernels import pointwise

            if pointwise.rope_reads(x.shape[-1]):
                return pointwise.rope(x, cos, sin, style="half")
        xf, half = x.float(), x.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
        return (xf * cos + rotated * sin).to(x.dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None
                ) -> torch.Tensor:
        """x [B, T, H]; cos/sin [T, qk_rope_head_dim] (``MlaRotaryEmbedding`` at the T new positions) -> [B, T, H]."""
        cfg = self.cfg
        B, T, _ = x.shape
        nh, nope, rope = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        q = self.q_proj(x) if cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rot = q.view(B, T, nh, cfg.qk_head_dim).transpose(1, 2).split([nope, rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(latent)).view(B, T, nh, nope + cfg.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([nope, cfg.v_head_dim], dim=-1)
        q_rot = self.rotate(q_rot, cos, sin)
        k_rot = self.rotate(k_rot.view(B, 1, T, rope), cos, sin)
        q = torch.cat((q_nope, q_rot), dim=-1)
        k = torch.cat((k_nope, k_rot.expand(B, nh, T, rope)), dim=-1)
        past = 0
        if cache is not None:
            past = 0 if cache.keys[self.layer_idx] is None else cache.keys[self.layer_idx].shape[2]
            k, v = cache.update(self.layer_idx, k, v)
        out = causal_attention(q, k, v, past, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, nh * cfg.v_head_dim))

