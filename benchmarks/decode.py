"""End-to-end decode tokens/s at batch 1 and 16 for ERNIE-4.5-21B-A3B (all 28 layers): bf16 vs W4 g128 vs
W2-code experts (+ W4 elsewhere).

    python benchmarks/decode.py [--layers 28] [--batch 1,16] [--prompt 32] [--steps 64] [--json FILE]
    python benchmarks/decode.py --tiny     # CPU, Triton interpreter, tiny model: checks the script only

The model is ``random:ernie-21b-a3b``'s architecture and dimensions built directly on the GPU with random
weights (the 43 GB bf16 checkpoint and its quantization are not needed to time a decoder: the kernels'
speed does not depend on the values). W4 g128 (symmetric): every linear except the router and the tied
embedding / LM head, as quantkit loads a w4g128 checkpoint (``QuantLinear``, ``QuantExperts``, backend triton).
W2-code: the routed experts in the 2-bit code through the fused MoE, the rest W4.

* eager: ``model(ids, KVCache)`` step by step, as ``generate`` runs (greedy, no sampling).
* graph: one decode step captured in a CUDA graph and replayed, with a preallocated KV cache of
  prompt + steps positions (attention masks the unwritten ones, so a step costs what a step at that context
  costs; replays reuse the captured RoPE position, which does not change the cost). bf16 has no graph: its
  expert loop syncs on the token counts; bf16-grouped is the same model with the experts computed by
  ``torch._grouped_mm`` (no host sync) and quantkit's Triton RMSNorm / RoPE / routing kernels (as W4 and
  W2-code run them), eager and graphed: "best x grouped" is the speedup over its best.
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gpu_common as gc  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, moe_num_experts=8, moe_k=2, moe_num_shared_experts=1,
            moe_intermediate_size=128, moe_layer_start_index=1, max_position_embeddings=4096)


def build(cfg, scheme: str, device: str):
    """A model with random weights: bf16, w4g128 or w2code, backend triton for the quantized ones."""
    import torch

    from quantkit.kernels import dispatch
    from quantkit.model.causal_lm import MoeForCausalLM
    from quantkit.model.layers import Experts, RotaryEmbedding

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # embeddings, norms, bf16 linears; the router is fp32 by construction
    try:
        with torch.device("meta"):
            model = MoeForCausalLM(cfg)
            if not scheme.startswith("bf16"):
                swap_quantized(model, cfg, scheme)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    randomize(model)
    model.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta).to(device)
    # bf16-grouped runs the Triton norm / RoPE / routing kernels too: it differs from W4 and W2-code only in how
    # the weights are stored and multiplied
    dispatch.set_backend(model, "torch" if scheme == "bf16" else "triton")
    if scheme == "bf16-grouped":  # the graph-capturable bf16 MoE (no host sync)
        for m in model.modules():
            if isinstance(m, Experts):
                m.forward = types.MethodType(gc.grouped_moe_bf16_module, m)
    return model.eval()


def swap_quantized(model, cfg, scheme: str) -> None:
    """W4 g128 (sym) QuantLinear for every linear, and W4 QuantExperts or 2-bit-code experts for the routed ones."""
    import torch
    from torch import nn

    from quantkit.model.layers import Experts
    from quantkit.nn.quantized import CODE2, QuantExperts, QuantLinear

    projs = ("gate_proj", "up_proj", "down_proj")
    schemes = {p: CODE2 if scheme == "w2code" else (4, 128, True) for p in projs}
    for mod in list(model.modules()):
        for leaf, child in list(mod.named_children()):
            if isinstance(child, nn.Linear):
                setattr(mod, leaf, QuantLinear(child.in_features, child.out_features, 4, 128, True, torch.bfloat16))
            elif isinstance(child, Experts):
                e, i, h = child.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
                setattr(mod, leaf, QuantExperts(e, h, i, schemes, torch.bfloat16))


def randomize(model) -> None:
    import torch

    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.dtype in (torch.int32, torch.int64):
                t.random_(0, 2**31 - 1) if t.dtype == torch.int32 else t.zero_()
            elif t.dtype == torch.uint8:
                t.random_(0, 256)
            elif name.endswith(("weight_scale", "super_scales")):
                t.uniform_(1e-3, 1e-2)
            elif name.endswith(("code_scale", "code_zp")):
                t.copy_(torch.randint(1, 64 * 256, t.shape, device=t.device).float() / 256)
            elif "norm" in name:
                t.fill_(1.0)
            elif t.is_floating_point():
                t.normal_(0, 0.02)


class StaticCache:
    """Preallocated K/V for a CUDA-graph decode step: written at ``pos`` (a device scalar)."""

    def __init__(self, cfg, batch: int, length: int, device: str):
        import torch

        shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=torch.bfloat16, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.start = 0

    def length(self) -> int:
        return self.start


def static_attention(self, x, cos, sin, cache):
    import torch
    import torch.nn.functional as F

    from quantkit.kernels import dispatch

    b, t, _ = x.shape
    q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
    k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
    v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
    q, k = dispatch.rope(q, cos, sin, self.backend), dispatch.rope(k, cos, sin, self.backend)  # as Attention does
    idx = cache.pos + torch.arange(t, device=x.device)
    keys, values = cache.k[self.layer_idx], cache.v[self.layer_idx]
    keys.index_copy_(2, idx, k.to(keys.dtype))
    values.index_copy_(2, idx, v.to(values.dtype))
    mask = torch.arange(keys.shape[2], device=x.device)[None, :] <= idx[:, None]
    out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, enable_gqa=True)
    return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


def decode_eager(model, batch: int, prompt: int, steps: int, device: str) -> float:
    import torch

    from quantkit.model.layers import KVCache

    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device=device)
    cache = KVCache(model.config.num_hidden_layers)
    nxt = model(ids, cache)[:, -1:].argmax(-1)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        nxt = model(nxt, cache)[:, -1:].argmax(-1)
    sync(device)
    return batch * steps / (time.perf_counter() - t0)


def decode_graph(model, batch: int, prompt: int, steps: int, device: str) -> float:
    import torch

    from quantkit.model.layers import Attention

    cfg = model.config
    for m in model.modules():
        if isinstance(m, Attention):
            m.forward = types.MethodType(static_attention, m)
    cache = StaticCache(cfg, batch, prompt + steps + 4, device)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=device)
    nxt = model(ids, cache)[:, -1:].argmax(-1)
    cache.pos.fill_(prompt)
    cache.start = prompt

    def step():
        nxt.copy_(model(nxt, cache)[:, -1:].argmax(-1))
        cache.pos.add_(1)

    replay = gc.graphed(step, device)
    cache.pos.fill_(prompt)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        replay()
    sync(device)
    for m in model.modules():
        if isinstance(m, Attention):
            del m.forward
    return batch * steps / (time.perf_counter() - t0)


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--schemes", default="bf16,bf16-grouped,w4g128,w2code")
    ap.add_argument("--json", default=None, help="output (default benchmarks/results/decode_<device>_<date>.json)")
    ap.add_argument("--tiny", action="store_true", help="CPU + Triton interpreter, tiny model (checks the script only)")
    args = ap.parse_args()
    device = gc.setup(args.tiny, "benchmarks/decode.py")
    import torch

    from quantkit.model.config import ErnieMoeConfig
    from quantkit.sources.random_models import ERNIE_21B_A3B, hf_config

    dims = dict(TINY) if args.tiny else dict(ERNIE_21B_A3B, num_hidden_layers=args.layers)
    cfg = ErnieMoeConfig.from_dict(hf_config(dims, "bfloat16"))
    steps, prompt = (2, 4) if args.tiny else (args.steps, args.prompt)
    info, rows = gc.device_info(device), []
    torch.manual_seed(0)
    with torch.no_grad():
        for scheme in args.schemes.split(","):
            model = build(cfg, scheme, device)
            wbytes = sum(t.nbytes for t in list(model.parameters()) + list(model.buffers()))
            for b in [int(v) for v in args.batch.split(",")]:
                row = {"scheme": scheme, "batch": b, "layers": cfg.num_hidden_layers, "weight_bytes": wbytes,
                       "eager_tok_s": decode_eager(model, b, prompt, steps, device)}
                row["graph_tok_s"] = None if scheme == "bf16" else decode_graph(model, b, prompt, steps, device)
                rows.append(row)
                print(row, flush=True)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()

    def best(r):
        return max(v for v in (r["eager_tok_s"], r["graph_tok_s"]) if v is not None)

    base = {r["batch"]: r["eager_tok_s"] for r in rows if r["scheme"] == "bf16"}
    grouped = {r["batch"]: best(r) for r in rows if r["scheme"] == "bf16-grouped"}
    for r in rows:
        r["speedup_vs_bf16_eager"] = best(r) / base[r["batch"]] if r["batch"] in base else None
        r["speedup_vs_bf16_grouped"] = best(r) / grouped[r["batch"]] if r["batch"] in grouped else None
    print(f"{info['device']}  torch {info['torch']}  triton {info['triton']}  layers {cfg.num_hidden_layers}")
    print(gc.table(rows, [("scheme", "scheme", ""), ("batch", "batch", "d"), ("weight_bytes", "weights B", ".3g"),
                          ("eager_tok_s", "eager tok/s", ".1f"), ("graph_tok_s", "graph tok/s", ".1f"),
                          ("speedup_vs_bf16_eager", "best x bf16", ".2f"),
                          ("speedup_vs_bf16_grouped", "best x grouped", ".2f")]))
    gc.save(args, "decode", info, {"info": info, "prompt": prompt, "steps": steps, "rows": rows})


if __name__ == "__main__":
    main()
