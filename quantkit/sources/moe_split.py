"""The expert split of one SwiGLU FFN: shared + routed experts, a router, refitted down projections.

The math behind ``demo:smollm2-moe`` (steps 1-5 of :mod:`quantkit.sources.smollm2_moe`'s docstring).
The MoE output it reports is computed by the model's own :class:`~quantkit.model.layers.SparseMoeBlock`
and routing by :func:`~quantkit.model.layers.route`, so the fit is measured exactly as the model runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantkit.model.config import MoeConfig
from quantkit.model.layers import SparseMoeBlock, route


@dataclass(frozen=True)
class Recipe:
    """Knobs of the expert split; the defaults are the published demo (bump smollm2_moe.RECIPE_VERSION with them)."""

    num_experts: int = 10  # routed experts per MoE layer
    top_k: int = 6  # routed experts per token
    num_shared: int = 2  # shared experts, stored as ONE MLP of width num_shared * expert_size
    expert_size: int = 128  # neurons per expert (moe_intermediate_size)
    calib_seqs: int = 48  # calibration sequences ...
    seq_len: int = 512  # ... of this many tokens, from:
    calib_data: str = "sotu:train+peoples-daily:train+pydoc:train"  # corpora joined with "+": sequences split evenly
    cluster_tokens: int = 4096  # tokens whose contribution profiles the clustering sees
    kmeans_iters: int = 15
    em_iters: int = 20
    load_range: tuple[float, float] = (0.25, 1.75)  # bounds on each expert's load, in units of the fair k / E
    logit_spread: float = 0.05  # per-token std of the router logits: near-uniform top-k weights
    router_ridge: float = 1e-3  # relative ridge of the router least squares
    refit_ridge: float = 1.0  # shrinkage of the down-projection refit towards the real weights
    seed: int = 0


def swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Neuron activations silu(x gate^T) * (x up^T): x [N, H], gate/up [I, H] -> [N, I]."""
    return F.silu(x @ gate.T) * (x @ up.T)


def _moe_block(t: dict, cfg: MoeConfig) -> SparseMoeBlock:
    """The model's MoE block holding tensors ``t`` (per-expert names relative to ``mlp.``)."""
    block = SparseMoeBlock(cfg)
    state = {n: v for n, v in t.items() if not n.startswith("experts.")}
    for p in ("gate_proj", "up_proj", "down_proj"):
        state[f"experts.{p}"] = torch.stack([t[f"experts.{e}.{p}.weight"] for e in range(cfg.moe_num_experts)])
    block.load_state_dict(state, strict=True)
    return block


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


def _balance_bias(score: torch.Tensor, k: int, load_range: tuple[float, float], iters: int = 60) -> torch.Tensor:
    """A bias b [E] such that top-k of (score + b) (score [N, E]) gives every expert a load within range.

    The load of an expert is the fraction of tokens that pick it, in units of the fair share k / E.
    Aux-loss-free balancing as ERNIE does it with ``e_score_correction_bias``: raise the bias of
    under-used experts, lower it for over-used ones, with a shrinking step (in units of score's spread).
    """
    E = score.shape[1]
    b = torch.zeros(E)
    step = score.std(-1).mean()
    for i in range(iters):
        load = torch.bincount((score + b).topk(k, dim=-1).indices.flatten(), minlength=E) / (score.shape[0] * k / E)
        off = load.clamp(*load_range) - load  # > 0: too little load, < 0: too much
        if not off.any():
            break
        b = b + step * off.sign() * 0.95**i
    return b


def _refine_clusters(energy: torch.Tensor, labels: torch.Tensor, E: int, k: int, iters: int, load_range) -> torch.Tensor:
    """Hard-EM on the captured energy: energy [T, n] per token and neuron, labels [n] -> labels [n].

    E-step: each token picks its k clusters of largest energy (balanced: every cluster's pick rate in
    ``load_range``). M-step: each neuron moves (balanced) to the cluster whose picking tokens hold most
    of its energy. Raises sum_t (energy in the picked clusters).
    """
    for _ in range(iters):
        ce = (energy @ F.one_hot(labels, E).float()).clamp_min(1e-30).log()  # [T, E] log energy per cluster
        picked = torch.zeros_like(ce).scatter_(1, (ce + _balance_bias(ce, k, load_range)).topk(k, dim=-1).indices, 1.0)
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


def split_ffn(x: torch.Tensor, wg: torch.Tensor, wu: torch.Tensor, wd: torch.Tensor, r: Recipe, cfg: MoeConfig,
              gen: torch.Generator) -> tuple[dict, dict, torch.Tensor]:
    """Split a SwiGLU FFN into shared + routed experts and fit the router (smollm2_moe docstring, 1-5).

    x [N, H] calibration FFN inputs; wg, wu [F, H]; wd [H, F] (F = 1536); ``cfg`` the MoE model's config.
    Returns (tensors named relative to ``mlp.``, per-layer info, the MoE output on x [N, H]).
    """
    E, I, k = r.num_experts, r.expert_size, r.top_k
    act = swiglu(x, wg, wu)  # [N, F] neuron activations
    y = act @ wd.T  # [N, H] dense FFN output: the target
    size = act.abs() * wd.norm(dim=0)  # [N, F] size of each neuron's contribution
    energy = size.pow(2).mean(0)  # [F]
    shared = energy.topk(r.num_shared * I).indices.sort().values  # [256]
    mask = torch.ones(wd.shape[1], dtype=torch.bool)
    mask[shared] = False
    routed = mask.nonzero().squeeze(1)  # [E * I]
    prof = size[torch.randperm(x.shape[0], generator=gen)[: r.cluster_tokens]][:, routed]  # [T, E * I]
    labels = _cluster_neurons(prof.T, E, r.kmeans_iters, gen)
    labels = _refine_clusters(prof.pow(2), labels, E, k, r.em_iters, r.load_range)
    experts = [routed[labels == e] for e in range(E)]  # neuron ids, [I] each

    e_out = torch.stack([act[:, n] @ wd[:, n].T for n in experts], 1)  # [N, E, H] expert outputs
    e_norm = e_out.norm(dim=-1)  # [N, E]
    gate, icpt = _fit_router(x, e_norm, r.router_ridge)
    alpha = r.logit_spread / (x @ gate.T).std(-1).mean()
    gate, bias = alpha * gate, alpha * icpt / E  # softmax(z)_e ~ (1 + z_e - mean z) / E for small z
    bias = bias + _balance_bias(torch.softmax(x @ gate.T, dim=-1) + bias, k, r.load_range)
    idx, wts = route(x, gate, bias, k, cfg.moe_norm_min)
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
    y_moe = _moe_block(t, cfg)(x)

    oracle = e_norm.topk(k, dim=-1).indices
    info = {
        "shared_energy": float(energy[shared].sum() / energy.sum()),
        "oracle_topk_energy": float(e_norm.pow(2).topk(k, -1).values.sum() / e_norm.pow(2).sum()),
        "router_recall": float((idx[:, :, None] == oracle[:, None, :]).any(-1).float().mean()),
        "rel_err": float((y_moe - y).pow(2).sum() / y.pow(2).sum()),
        "expert_load": torch.bincount(idx.flatten(), minlength=E).div(idx.numel()).tolist(),
    }
    return t, info, y_moe
