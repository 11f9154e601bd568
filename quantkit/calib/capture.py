"""Per-layer capture: what every linear of a decoder layer sees on the calibration tokens.

For each input group of a layer we accumulate, in fp32 on the compute device:
    H      = Σ w_t x_tᵀ x_t       the (optionally routing-weighted) Hessian GPTQ needs   [.., K, K]
    absmax = Σ |x_t| / n          mean |activation| per input channel, AWQ's statistic   [.., K]
Input groups (keys, relative to the layer): ``self_attn.q_proj`` (shared by q/k/v), ``self_attn.o_proj``,
``mlp.gate_proj`` / ``mlp.down_proj`` (dense), ``mlp.shared_experts.gate_proj`` / ``.down_proj``,
``mlp.experts.gate_proj`` ``[E, H, H]`` (shared by gate/up) and ``mlp.experts.down_proj`` ``[E, I, I]``.
Multi-head latent attention (DeepSeek-V3): ``self_attn.q_a_proj`` (or ``q_proj``; shared by
``kv_a_proj_with_mqa``, ``LayerCapture.aliases``), ``self_attn.q_b_proj``, ``self_attn.kv_b_proj``, ``self_attn.o_proj``.

Routed experts: ``routed`` capture sees each expert's routed tokens only; ``all`` pushes every token
through every expert for the statistics while the layer's output still uses the real routing, so no
expert starves and the forward pass is unchanged. ``prob_weighted`` weights each token by its routing
weight for that expert (renormalised top-k weight when routed, softmax probability with ``all``).
``tokens[e]`` always counts the tokens the router actually sent to expert e.

With ``fp_hidden`` (the same windows' hidden states through the unquantized model) each batch is run
twice: first the fp stream, whose inputs to every attention / dense-MLP / shared-expert linear are kept
for that batch, then the quantized stream, which accumulates H as usual and also the cross moment
    M = Σ x_fp x̃ᵀ      [K, K]   (x_fp: fp model's input, x̃: the quantized model's input to the same linear)
that lets GPTQ aim at the fp model's outputs (``quantkit.quant.gptq.fp_target``). Routed experts see
different tokens in the two streams and get no M.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import repeat

import torch
import torch.nn.functional as F

from quantkit.model.layers import SparseMoeBlock
from quantkit.model.routers import scores as router_scores

EXPERT_CALIBRATION = ("routed", "all")
SHARES_INPUT = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}


class Stat:
    """Running Hessian and mean |x| for one input group, or E of them (``lead=(E,)``)."""

    def __init__(self, k: int, device, lead: tuple[int, ...] = ()):
        self.H = torch.zeros(*lead, k, k, dtype=torch.float32, device=device)
        self.abs_sum = torch.zeros(*lead, k, dtype=torch.float32, device=device)
        self.count = torch.zeros(lead, dtype=torch.float64, device=device)
        self.M: torch.Tensor | None = None  # Σ x_fp x̃ᵀ, only with an fp stream (2-D stats)

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None, index: int | None = None,
            fp: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if x.shape[0] == 0:
            return
        if fp is not None:
            if self.M is None:
                self.M = torch.zeros_like(self.H)
            self.M.addmm_(fp.reshape(-1, x.shape[-1]).float().T, x)
        xw = x if weights is None else x * weights.reshape(-1, 1).float()
        H, a, c = (self.H, self.abs_sum, self.count) if index is None else (self.H[index], self.abs_sum[index], self.count[index:index + 1])
        H.addmm_(xw.T, x)
        a.add_(x.abs().sum(0))
        c.add_(x.shape[0])

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count.clamp_min(1).to(self.abs_sum.dtype)[..., None]


@dataclass
class LayerCapture:
    stats: dict[str, Stat] = field(default_factory=dict)
    expert_tokens: torch.Tensor | None = None  # [E] int64, tokens routed to each expert
    aliases: dict[str, str] = field(default_factory=dict)  # module -> the key of the module whose input it reads

    def stat_for(self, module: str) -> Stat:
        """The input statistics of a module relative to the layer (``self_attn.k_proj`` -> q_proj's)."""
        if module in self.aliases:
            return self.stats[self.aliases[module]]
        stem, _, leaf = module.rpartition(".")
        return self.stats[f"{stem}.{SHARES_INPUT.get(leaf, leaf)}"]


def _linear_hook(cap: LayerCapture, key: str, k: int, device, fp_inputs: dict | None):
    cap.stats[key] = Stat(k, device)

    def hook(_mod, args):
        if fp_inputs is not None and fp_inputs.get("_fp_pass"):
            fp_inputs[key] = args[0]
            return
        cap.stats[key].add(args[0], fp=None if fp_inputs is None else fp_inputs.pop(key))

    return hook


def capture_layer(layer, hidden, cos, sin, *, expert_calibration: str = "routed",
                  prob_weighted: bool = False, fp_hidden=None) -> LayerCapture:
    """Run ``layer`` over every batch in ``hidden`` (an iterable of [b, T, H]), collecting statistics;
    ``fp_hidden``: the fp model's hidden states of the same batches (adds the cross moments M)."""
    if expert_calibration not in EXPERT_CALIBRATION:
        raise ValueError(f"expert calibration must be one of {EXPERT_CALIBRATION}")
    device = next(layer.parameters()).device
    cap = LayerCapture()
    handles = []
    fp_inputs = None if fp_hidden is None else {"_fp_pass": False}
    attn = layer.self_attn
    if hasattr(attn, "kv_a_proj_with_mqa"):  # MLA: kv_a_proj_with_mqa reads the q projection's input
        lead = "self_attn.q_proj" if hasattr(attn, "q_proj") else "self_attn.q_a_proj"
        cap.aliases["self_attn.kv_a_proj_with_mqa"] = lead
        targets = {lead: getattr(attn, lead.rpartition(".")[2]), "self_attn.kv_b_proj": attn.kv_b_proj,
                   "self_attn.o_proj": attn.o_proj}
        if hasattr(attn, "q_b_proj"):
            targets["self_attn.q_b_proj"] = attn.q_b_proj
    else:
        targets = {"self_attn.q_proj": attn.q_proj, "self_attn.o_proj": attn.o_proj}
    mlp = layer.mlp
    if isinstance(mlp, SparseMoeBlock):
        if mlp.shared_experts is not None:
            targets["mlp.shared_experts.gate_proj"] = mlp.shared_experts.gate_proj
            targets["mlp.shared_experts.down_proj"] = mlp.shared_experts.down_proj
    else:
        targets["mlp.gate_proj"], targets["mlp.down_proj"] = mlp.gate_proj, mlp.down_proj
    for key, mod in targets.items():
        handles.append(mod.register_forward_pre_hook(_linear_hook(cap, key, mod.in_features, device, fp_inputs)))

    if isinstance(mlp, SparseMoeBlock):
        ex = mlp.experts
        E, I, Hd = ex.up_proj.shape  # [E, I, H]
        cap.stats["mlp.experts.gate_proj"] = Stat(Hd, device, (E,))
        cap.stats["mlp.experts.down_proj"] = Stat(I, device, (E,))
        cap.expert_tokens = torch.zeros(E, dtype=torch.int64)

        def on_block_input(_mod, args):
            if fp_inputs is not None and fp_inputs["_fp_pass"]:
                return
            x = args[0].reshape(-1, args[0].shape[-1])
            ids, _ = mlp.route(x)
            cap.expert_tokens += torch.bincount(ids.flatten().cpu(), minlength=E)
            if expert_calibration == "all":
                probs = router_scores(x, mlp.gate.weight, mlp.router_spec)  # the family's unbiased scores
                for e in range(E):
                    w = probs[:, e] if prob_weighted else None
                    h = F.silu(ex.project(e, "gate_proj", x)) * ex.project(e, "up_proj", x)
                    cap.stats["mlp.experts.gate_proj"].add(x, w, index=e)
                    cap.stats["mlp.experts.down_proj"].add(h, w, index=e)

        def observer(e, x, h, w):
            if expert_calibration == "routed" and not (fp_inputs is not None and fp_inputs["_fp_pass"]):
                cap.stats["mlp.experts.gate_proj"].add(x, w if prob_weighted else None, index=e)
                cap.stats["mlp.experts.down_proj"].add(h, w if prob_weighted else None, index=e)

        handles.append(mlp.register_forward_pre_hook(on_block_input))
        ex.observer = observer
    try:
        with torch.no_grad():
            for h, hf in zip(hidden, fp_hidden if fp_hidden is not None else repeat(None)):
                if hf is not None:
                    fp_inputs["_fp_pass"] = True
                    layer(hf, cos, sin)
                    fp_inputs["_fp_pass"] = False
                layer(h, cos, sin)
    finally:
        for h in handles:
            h.remove()
        if isinstance(mlp, SparseMoeBlock):
            mlp.experts.observer = None
    return cap
