"""Building blocks of the MoE families: RMSNorm, RoPE (interleaved, rotate-half, partial), GQA attention (q/k/v
bias, per-head or whole-projection q/k norm), SwiGLU MLP, router, experts, shared experts (plain or gated).

Parameter names are quantkit's canonical ones (ERNIE's Hub names: ``q_proj``, ``mlp.gate``, ``moe_statics``...);
each family's ``ArchSpec.names`` maps them to its Hub names. The routed experts live here as 3-D ``[E, N, K]``
tensors (``gate_proj``/``up_proj``: ``[E, I, H]``, ``down_proj``: ``[E, H, I]``) and are per-expert on disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.kernels import dispatch
from quantkit.model.config import MoeConfig
from quantkit.model.routers import RouterSpec
from quantkit.model.routers import route as spec_route


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with the statistics in fp32, normalised in x's dtype, then times the weight."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class RMSNorm(nn.Module):
    """``backend`` 'triton' (``dispatch.set_backend``): one launch instead of the torch ops."""

    backend = "torch"

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.rms_norm(x, self.weight, self.eps, self.backend)


class RotaryEmbedding(nn.Module):
    """cos/sin tables over ``dim`` rotary dims (the head dim, or its first part with partial rotary).
    ``style`` 'interleaved' (ERNIE, GPT-J): pairs (2i, 2i+1) rotate together, each frequency repeated twice;
    'half' (Llama, Qwen, Mixtral, OLMoE, GLM): pairs (i, i + dim/2), the frequencies concatenated twice."""

    def __init__(self, dim: int, theta: float, style: str = "interleaved"):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.style = style

    @torch.no_grad()
    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] (int) -> cos, sin [T, dim] in fp32."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, dim/2]
        if self.style == "half":
            return torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
        return freqs.cos().repeat_interleave(2, dim=-1), freqs.sin().repeat_interleave(2, dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str = "interleaved") -> torch.Tensor:
    """x [B, heads, T, D], cos/sin [T, R] with R <= D: the first R dims rotate, the rest pass (partial rotary).
    Rotation in fp32, result in x's dtype."""
    xf = x.float()
    r = cos.shape[-1]
    xr, xp = (xf, None) if r == xf.shape[-1] else (xf[..., :r], xf[..., r:])
    if style == "half":
        rotated = torch.cat((-xr[..., r // 2:], xr[..., : r // 2]), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    out = xr * cos + rotated * sin
    return (out if xp is None else torch.cat((out, xp), dim=-1)).to(x.dtype)


class KVCache:
    """Keys/values per layer, ``[B, kv_heads, T, D]``, grown by concatenation."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def length(self) -> int:
        k = next((k for k in self.keys if k is not None), None)
        return 0 if k is None else k.shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attention(nn.Module):
    backend = "torch"  # 'triton' (``dispatch.set_backend``): RoPE in one launch per tensor

    def __init__(self, cfg: MoeConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.rope_style, self.qk_norm = cfg.rope_style, cfg.qk_norm
        h, b = cfg.hidden_size, cfg.qkv_bias
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=b)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=b)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=cfg.o_bias)
        if cfg.qk_norm != "none":  # 'head': over each head's D (Qwen3, GLM); 'proj': over all of q / k (OLMoE)
            per = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per else self.n_heads * self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim if per else self.n_kv * self.head_dim, cfg.rms_norm_eps)

    @staticmethod
    def linears(cfg: MoeConfig) -> list[tuple[str, tuple[int, int]]]:
        """(name, [N, K]) of the quantizable linears, in checkpoint order (every attention layer class has this)."""
        H, D, nq, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        return [("q_proj", (nq * D, H)), ("k_proj", (nkv * D, H)), ("v_proj", (nkv * D, H)), ("o_proj", (H, nq * D))]

    def forward(self, x, cos, sin, cache: KVCache | None = None) -> torch.Tensor:
        """x [B, T, H], cos/sin [T, rotary dims] -> [B, T, H]; with ``cache``, keys/values are appended to it."""
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = dispatch.rope(q, cos, sin, self.backend, self.rope_style), dispatch.rope(k, cos, sin, self.backend, self.rope_style)
        past = 0
        if cache is not None:
            past = 0 if cache.keys[self.layer_idx] is None else cache.keys[self.layer_idx].shape[2]
            k, v = cache.update(self.layer_idx, k, v)
        if past == 0 or T == 1:  # a prompt: causal; one new token: it sees every key (no mask to build)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0 and T > 1, enable_gqa=True)
        else:  # new queries sit at positions past..past+T-1 and may see every key up to their own
            mask = torch.arange(past + T, device=x.device)[None, :] <= (past + torch.arange(T, device=x.device))[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Used for dense layers and for the shared experts.

    With ``backend`` 'triton' (``dispatch.set_backend``) and quantized gate and up projections without bias
    (modules with ``kernel_weight``), gate, up and the SiLU product are one Triton launch."""

    backend = "torch"

    def __init__(self, hidden: int, inter: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate_proj, self.up_proj
        if (self.backend != "torch" and hasattr(g, "kernel_weight") and hasattr(u, "kernel_weight")
                and g.bias is None and u.bias is None):
            return self.down_proj(dispatch.gate_up(x, g.kernel_weight(), u.kernel_weight(), self.backend))
        return self.down_proj(F.silu(g(x)) * u(x))


class MoeStatics(nn.Module):
    """Holds the routing correction bias (fp32; ``[1, E]`` for ERNIE, ``[E]`` for GLM, as each Hub stores it):
    it changes which experts are chosen, not their weights."""

    def __init__(self, num_experts: int, rank: int = 2):
        super().__init__()
        shape = (1, num_experts) if rank == 2 else (num_experts,)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(shape, dtype=torch.float32), requires_grad=False)


def route(
    x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, top_k: int, norm_min: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """ERNIE routing in fp32 (the twin the routing kernel's tests name): ``routers.route`` with ERNIE's spec.
    x [T, H] -> (topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
    spec = RouterSpec(top_k=top_k, num_experts=gate_weight.shape[0], has_bias=True, norm_min=norm_min)
    return spec_route(x, gate_weight, bias, spec)


class Experts(nn.Module):
    """E routed SwiGLU experts held as 3-D tensors: gate/up ``[E, I, H]``, down ``[E, H, I]``.

    ``forward`` loops over the experts that received tokens. Quantized subclasses override
    ``project(e, name, x)``, the one place that touches an expert's weight.
    """

    def __init__(self, num_experts: int, hidden: int, inter: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.up_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, inter))

    def project(self, e: int, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [n, K] @ W_e^T for projection ``name`` of expert e -> [n, N]."""
        return F.linear(x, getattr(self, name)[e])

    # Calibration sets ``observer(e, x, h, w)`` to see, per expert, its inputs x [n, H], its down_proj
    # inputs h [n, I] and the tokens' routing weights w [n]; None in normal use.
    observer = None

    def expert_forward(self, e: int, x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.project(e, "gate_proj", x)) * self.project(e, "up_proj", x)
        if self.observer is not None:
            self.observer(e, x, h, weights)
        return self.project(e, "down_proj", h)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                add: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, H], topk_ids/topk_weights [T, k] -> Σ_k w·expert(x) (+ ``add``: the shared experts) [T, H]."""
        out = torch.zeros_like(x)
        counts = torch.bincount(topk_ids.flatten(), minlength=self.num_experts).tolist()
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok, slot = torch.where(topk_ids == e)
            w = topk_weights[tok, slot]
            y = self.expert_forward(e, x[tok], w) * w[:, None].to(x.dtype)
            out.index_add_(0, tok, y.to(out.dtype))
        return out if add is None else out + add


class Router(nn.Module):
    """``mlp.gate``: an fp32 ``[E, H]`` weight, never quantized."""

    def __init__(self, num_experts: int, hidden: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, dtype=torch.float32))


class SparseMoeBlock(nn.Module):
    """Router + routed experts + shared experts. ``backend`` (``dispatch.set_backend``) 'triton' routes with one
    Triton launch; the shared experts' output goes into the experts' combine (one launch in the fused MoE)."""

    backend = "torch"

    def __init__(self, cfg: MoeConfig):
        super().__init__()
        self.router_spec = cfg.router_spec
        self.gate = Router(cfg.moe_num_experts, cfg.hidden_size)
        self.moe_statics = MoeStatics(cfg.moe_num_experts, cfg.spec.router_bias_rank) if cfg.router_bias else None
        self.experts = Experts(cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = MLP(cfg.hidden_size, cfg.shared_width, cfg.mlp_bias) if cfg.shared_width > 0 else None
        # Qwen2-MoE: the shared expert's output is scaled by sigmoid(x @ g^T), g [1, H], per token
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if cfg.shared_expert_gate else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, k] int64, topk_weights [T, k] fp32)."""
        bias = self.moe_statics.e_score_correction_bias if self.moe_statics is not None else None
        return dispatch.route(x, self.gate.weight, bias, self.router_spec, self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        ids, weights = self.route(x)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        if self.shared_expert_gate is not None:
            shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
        return self.experts(x, ids, weights, shared).reshape(shape)
