"""An orthogonal rotation of the residual stream folded into the weights (QuaRot / SpinQuant style, fixed Q).

    rotate_checkpoint(src, dst, seed=0) -> dst

The output is a checkpoint of the same architecture (``Ernie4_5_MoeForCausalLM``, same tensor names and
shapes) whose fp model computes the same logits: servers and transformers load it as before, while the
weights that read or write the residual stream have their outliers spread over all channels, which
suits a per-group integer grid. With Q [H, H] orthogonal (QR of a seeded Gaussian, in float64):

1. Every RMSNorm weight γ is folded into the linears that read its output (RMSNorm(x)·γ then W equals
   RMSNorm(x) then W·diag(γ)), and set to 1. A unit-weight RMSNorm commutes with Q, since ‖xQ‖ = ‖x‖.
2. Readers of the residual, ``W [out, H] -> W Q``: q/k/v; the dense MLP's, shared and routed experts'
   gate/up; and the router ``mlp.gate`` (it reads the same normed input, so its logits and the routing
   are unchanged; it stays fp32, and ``e_score_correction_bias`` is untouched).
3. Writers, ``W [H, in] -> Qᵀ W``: o_proj and every down_proj. Embeddings ``E [V, H] -> E Q``.
4. The head reads the final norm: ``lm_head = E diag(γ_final) Q``. That differs from the rotated
   embeddings, so a tied checkpoint is written untied (``tie_word_embeddings: false`` + ``lm_head.weight``).

The math is float64, the tensors are stored back in their own dtype (the test checks fp32 logits to
1e-4). The whole checkpoint is read into memory: fine for the demo, not for a 21B model on a small host.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantkit.errors import UsageError

READS = re.compile(r"(self_attn\.[qkv]_proj|mlp\.(gate_proj|up_proj|gate|shared_experts\.(gate|up)_proj|"
                   r"experts\.\d+\.(gate|up)_proj))\.weight$")
WRITES = re.compile(r"(self_attn\.o_proj|mlp\.(down_proj|shared_experts\.down_proj|experts\.\d+\.down_proj))\.weight$")


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal [n, n] matrix (float64): QR of a Gaussian with the sign fix of R's diagonal."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def rotate_state_dict(w: dict[str, torch.Tensor], Q: torch.Tensor, tied: bool) -> dict[str, torch.Tensor]:
    """The rotated tensors (module doc); ``w`` uses the checkpoint's (disk) names."""
    out = dict(w)
    d = lambda t: t.double()
    for name, t in w.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)$", name)
        if m is None:
            continue
        layer, rest = m.groups()
        if READS.search(name):
            norm = "input_layernorm" if rest.startswith("self_attn") else "post_attention_layernorm"
            gamma = d(w[f"model.layers.{layer}.{norm}.weight"])
            out[name] = (d(t) * gamma[None, :] @ Q).to(t.dtype)
        elif WRITES.search(name):
            out[name] = (Q.T @ d(t)).to(t.dtype)
        elif rest.endswith("layernorm.weight"):
            out[name] = torch.ones_like(t)
    E = w["model.embed_tokens.weight"]
    head = d(E if tied else w["lm_head.weight"])
    out["model.embed_tokens.weight"] = (d(E) @ Q).to(E.dtype)
    out["lm_head.weight"] = (head * d(w["model.norm.weight"])[None, :] @ Q).to(E.dtype)
    out["model.norm.weight"] = torch.ones_like(w["model.norm.weight"])
    return out


def rotate_checkpoint(src: str | Path, dst: str | Path, seed: int = 0) -> Path:
    """Write the rotated copy of the (unquantized) checkpoint ``src`` to ``dst``; see the module doc."""
    src, dst = Path(src), Path(dst)
    cfg = json.loads((src / "config.json").read_text())
    if "quantization_config" in cfg:
        raise UsageError(f"{src} is quantized; rotate the original checkpoint, then quantize the rotated one")
    from quantkit.model.config import MoeConfig

    arch = MoeConfig.from_dict(cfg).arch
    if arch != "ernie":  # READS / WRITES name ERNIE's tensors; other families' readers of the residual differ
        raise UsageError(f"{src}: the rotation supports ERNIE-4.5-MoE checkpoints only, not {arch}")
    if cfg.get("use_bias"):
        raise UsageError(f"{src}: linears with biases are not supported by the rotation")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{src} holds no .safetensors files")
    w: dict[str, torch.Tensor] = {}
    for f in files:
        w.update(load_file(str(f)))
    w = {k: v for k, v in w.items() if not k.startswith("mtp")}
    tied = bool(cfg.get("tie_word_embeddings", False)) or "lm_head.weight" not in w
    rotated = rotate_state_dict(w, random_orthogonal(cfg["hidden_size"], seed), tied)
    dst.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in rotated.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg["tie_word_embeddings"] = False
    cfg["quantkit_rotation"] = {"kind": "random_orthogonal", "seed": seed, "folded_norms": True}
    (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    return dst
