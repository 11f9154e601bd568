"""Apply AWQ-style scaling to a materialised decoder layer, using its calibration capture.

Smoothing groups and where 1/s is folded (the fp model's outputs are unchanged by the folding):
  input_layernorm          -> q, k, v
  post_attention_layernorm -> dense gate/up, or shared experts' gate/up + all routed experts' gate/up
                              (one shared s for the group, since it is folded into one norm; the fp32
                              router reads the same input, so its columns get s too and routing is unchanged)
  up_proj rows             -> down_proj columns (dense MLP, shared experts, and each routed expert)
  v_proj rows              -> o_proj columns (v's channel c feeds every q head of its kv group)
Multi-head latent attention (DeepSeek-V3), all exact as well:
  input_layernorm          -> q_a_proj (or q_proj) + kv_a_proj_with_mqa
  q_a_layernorm            -> q_b_proj
  kv_a_layernorm           -> kv_b_proj
  kv_b_proj's v rows       -> o_proj columns (one to one: o's input is the heads' v; attention is linear in v)
  (kv_b_proj's k_nope rows go through the softmax: not scaled)
The capture's Hessians and mean |x| are rescaled in place, so GPTQ afterwards sees the scaled inputs.
With ``Rule.awq_block`` the q/k/v and norm -> gate/up groups are decided at the attention / MLP output on a
token sample of the layer's inputs (``block_sample``; ``quantkit.quant.awq`` has the rule); MLA keeps the
Hessian error.
"""

from __future__ import annotations

import torch

from quantkit.calib.capture import LayerCapture
from quantkit.model.layers import SparseMoeBlock
from quantkit.quant.awq import ALPHAS, scale_hessian, search_scale, weight_mean
from quantkit.quant.config import PlanEntry
from quantkit.quant.rtn import rtn

BLOCK_TOKENS = 4096  # calibration tokens the block-output scoring runs (whole windows, the first ones)


def _quantizer(entry: PlanEntry):
    r = entry.rule
    return lambda w: rtn(w, r.bits, entry.group_size, r.symmetric, clip_search=r.use_clip, scale_dtype=torch.float32).dequantize()


def _rescale_stat(cap: LayerCapture, key: str, s: torch.Tensor) -> None:
    st = cap.stats[key]
    st.H = scale_hessian(st.H, s)
    if st.M is not None:  # both streams' inputs are divided by s
        st.M = scale_hessian(st.M, s)
    st.abs_sum = st.abs_sum / s


def block_sample(hidden, tokens: int = BLOCK_TOKENS) -> torch.Tensor:
    """The first calibration batches of a layer's inputs, [b, T, H], until ``tokens`` tokens."""
    parts, n = [], 0
    for h in hidden:
        parts.append(h)
        n += h.shape[0] * h.shape[1]
        if n >= tokens:
            break
    return torch.cat(parts)[:max(1, -(-tokens // parts[0].shape[1]))]


def _block_rescore(forward, params, quant):
    """s -> mean squared change of ``forward()`` when each weight tensor in ``params`` is Q(W·s)/s (restored after)."""
    with torch.no_grad():
        ref = forward()
    saved = [p.data.clone() for p in params]  # the fp weights, put back after every candidate

    def score(s: torch.Tensor) -> float:
        try:
            for p, w in zip(params, saved):
                p.data.copy_((quant(w.float() * s) / s).to(p.dtype))
            with torch.no_grad():
                return float((forward() - ref).float().pow(2).mean())
        finally:
            for p, w in zip(params, saved):
                p.data.copy_(w)
    return score


def apply_awq(layer, cap: LayerCapture, entries: dict[str, PlanEntry], alphas=ALPHAS,
              sample: tuple | None = None) -> dict[str, float]:
    """Search and fold the scales of every group whose members are all planned. Returns α per group.
    ``sample`` = (hidden [b, T, H], cos, sin): the layer's inputs for block-output scoring (``Rule.awq_block``)."""
    chosen: dict[str, float] = {}
    attn, mlp = layer.self_attn, layer.mlp

    def run(name, members, stat_key, mean_abs=None, expand=None, reduce=None, block=None):
        if not all(m in entries for m, _, _ in members):
            return None
        pairs = [(w, H) for _, w, H in members]
        first = entries[members[0][0]]
        w_mean = weight_mean([w for w, _ in pairs], first.group_size)
        rescore = None
        if block is not None and sample is not None and first.rule.awq_block:
            rescore = _block_rescore(block(), [w for _, w, _ in members], _quantizer(first))
        s, alpha, _ = search_scale(pairs, cap.stats[stat_key].mean_abs if mean_abs is None else mean_abs,
                                   _quantizer(first), alphas, expand, w_mean if reduce is None else reduce(w_mean),
                                   rescore=rescore)
        chosen[name] = alpha
        return s

    def attention_block():
        h, cos, sin = sample
        with torch.no_grad():
            x = layer.input_layernorm(h)
        return lambda: attn(x, cos, sin)

    def mlp_block():
        h, cos, sin = sample
        with torch.no_grad():
            x = layer.post_attention_layernorm(h + attn(layer.input_layernorm(h), cos, sin))
        return lambda: mlp(x)

    if hasattr(attn, "kv_a_proj_with_mqa"):
        _smooth_mla(layer, cap, entries, run)
    else:
        # input_layernorm -> q/k/v
        H = cap.stats["self_attn.q_proj"].H
        s = run("qkv", [(f"self_attn.{p}", getattr(attn, p).weight, H) for p in ("q_proj", "k_proj", "v_proj")], "self_attn.q_proj",
                block=attention_block)
        if s is not None:
            layer.input_layernorm.weight.data /= s.to(layer.input_layernorm.weight.dtype)
            for p in ("q_proj", "k_proj", "v_proj"):
                getattr(attn, p).weight.data *= s
            _rescale_stat(cap, "self_attn.q_proj", s)

        # v rows -> o columns, per kv channel (shared by the q heads of its group)
        n_rep, D = attn.n_heads // attn.n_kv, attn.head_dim
        o_abs = cap.stats["self_attn.o_proj"].mean_abs.view(attn.n_kv, n_rep, D).mean(1).reshape(-1)
        expand = lambda t: t.view(attn.n_kv, 1, D).expand(attn.n_kv, n_rep, D).reshape(-1)
        per_kv = lambda t: t.view(attn.n_kv, n_rep, D).mean(1).reshape(-1)
        if "self_attn.v_proj" in entries:
            s_kv = run("v->o", [("self_attn.o_proj", attn.o_proj.weight, cap.stats["self_attn.o_proj"].H)],
                       "self_attn.o_proj", o_abs, expand, per_kv)
            if s_kv is not None:
                attn.v_proj.weight.data /= s_kv[:, None]
                if attn.v_proj.bias is not None:  # q/k/v bias (Qwen2-MoE, GLM): v's rows scale with their bias
                    attn.v_proj.bias.data /= s_kv
                attn.o_proj.weight.data *= expand(s_kv)
                _rescale_stat(cap, "self_attn.o_proj", expand(s_kv))

    # post_attention_layernorm -> gate/up of everything in the MLP
    if isinstance(mlp, SparseMoeBlock):
        ex = mlp.experts
        Hx = cap.stats["mlp.experts.gate_proj"].H
        members = [("mlp.experts.gate_proj", ex.gate_proj, Hx), ("mlp.experts.up_proj", ex.up_proj, Hx)]
        keys = ["mlp.experts.gate_proj"]
        if mlp.shared_experts is not None:
            Hs = cap.stats["mlp.shared_experts.gate_proj"].H
            members += [("mlp.shared_experts.gate_proj", mlp.shared_experts.gate_proj.weight, Hs),
                        ("mlp.shared_experts.up_proj", mlp.shared_experts.up_proj.weight, Hs)]
            keys.append("mlp.shared_experts.gate_proj")
        s = run("norm->gate/up", members, keys[-1], cap.stats[keys[-1]].mean_abs if len(keys) > 1 else
                cap.stats["mlp.experts.gate_proj"].mean_abs.mean(0), block=mlp_block)
        if s is not None:
            layer.post_attention_layernorm.weight.data /= s.to(layer.post_attention_layernorm.weight.dtype)
            mlp.gate.weight.data *= s  # the router reads the same normed input: exact, it stays fp32
            if mlp.shared_expert_gate is not None:  # Qwen2-MoE's shared-expert gate reads it too
                mlp.shared_expert_gate.weight.data *= s.to(mlp.shared_expert_gate.weight.dtype)
            ex.gate_proj.data *= s
            ex.up_proj.data *= s
            if mlp.shared_experts is not None:
                mlp.shared_experts.gate_proj.weight.data *= s
                mlp.shared_experts.up_proj.weight.data *= s
            for k in keys:
                _rescale_stat(cap, k, s)
        # up -> down, per routed expert
        if "mlp.experts.up_proj" in entries and "mlp.experts.down_proj" in entries:
            st = cap.stats["mlp.experts.down_proj"]
            q = _quantizer(entries["mlp.experts.down_proj"])
            for e in range(ex.num_experts):
                if float(st.count[e]) == 0:
                    continue
                s_e, _, _ = search_scale([(ex.down_proj[e], st.H[e])], st.mean_abs[e], q, alphas,
                                         w_mean=weight_mean([ex.down_proj[e]], entries["mlp.experts.down_proj"].group_size))
                ex.up_proj.data[e] /= s_e[:, None]
                ex.down_proj.data[e] *= s_e
                st.H[e] = scale_hessian(st.H[e], s_e)
            chosen["experts up->down"] = -1.0  # per expert; not one α
        mlps = [("mlp.shared_experts", mlp.shared_experts)] if mlp.shared_experts is not None else []
    else:
        H = cap.stats["mlp.gate_proj"].H
        s = run("norm->gate/up", [("mlp.gate_proj", mlp.gate_proj.weight, H), ("mlp.up_proj", mlp.up_proj.weight, H)], "mlp.gate_proj",
                block=mlp_block)
        if s is not None:
            layer.post_attention_layernorm.weight.data /= s.to(layer.post_attention_layernorm.weight.dtype)
            mlp.gate_proj.weight.data *= s
            mlp.up_proj.weight.data *= s
            _rescale_stat(cap, "mlp.gate_proj", s)
        mlps = [("mlp", mlp)]
    for name, m in mlps:  # up rows -> down columns of dense / shared MLPs
        key = f"{name}.down_proj"
        s = run(f"{name} up->down", [(key, m.down_proj.weight, cap.stats[key].H)], key) if f"{name}.up_proj" in entries else None
        if s is not None:
            m.up_proj.weight.data /= s[:, None]
            if m.up_proj.bias is not None:
                m.up_proj.bias.data /= s
            m.down_proj.weight.data *= s
            _rescale_stat(cap, key, s)
    return chosen


def _smooth_mla(layer, cap: LayerCapture, entries: dict[str, PlanEntry], run) -> None:
    """The latent attention's smoothing groups (module docstring); ``run`` searches one group's scale."""
    attn = layer.self_attn
    lead = "q_proj" if hasattr(attn, "q_proj") else "q_a_proj"
    groups = [("input_layernorm", layer.input_layernorm, (lead, "kv_a_proj_with_mqa"), f"self_attn.{lead}")]
    if lead == "q_a_proj":
        groups.append(("q_a_layernorm", attn.q_a_layernorm, ("q_b_proj",), "self_attn.q_b_proj"))
    groups.append(("kv_a_layernorm", attn.kv_a_layernorm, ("kv_b_proj",), "self_attn.kv_b_proj"))
    for norm_name, norm, projs, key in groups:
        H = cap.stats[key].H
        s = run(f"{norm_name}->{'+'.join(projs)}", [(f"self_attn.{p}", getattr(attn, p).weight, H) for p in projs], key)
        if s is not None:
            norm.weight.data /= s.to(norm.weight.dtype)
            for p in projs:
                getattr(attn, p).weight.data *= s
            _rescale_stat(cap, key, s)
    if "self_attn.kv_b_proj" in entries:  # v rows -> o columns: column h*v + c of o reads row h*(nope+v) + nope + c
        s = run("v->o", [("self_attn.o_proj", attn.o_proj.weight, cap.stats["self_attn.o_proj"].H)], "self_attn.o_proj")
        if s is not None:
            c = attn.cfg
            kv_b = attn.kv_b_proj.weight.data.view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, -1)
            kv_b[:, c.qk_nope_head_dim:] /= s.view(c.num_heads, c.v_head_dim, 1)
            attn.o_proj.weight.data *= s
            _rescale_stat(cap, "self_attn.o_proj", s)
