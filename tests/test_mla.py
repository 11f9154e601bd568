"""Multi-head latent attention (``quantkit.model.mla``) against transformers' ``DeepseekV3Attention`` with the same
weights (fp32, max abs diff <= 1e-5): q_lora_rank set and None, several head dims, interleaved and rotate-half rope
weights, yarn RoPE (scale and cos/sin) and none; and with the KV cache (prefill, then chunks and single tokens)
equal to a full recompute."""

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)

from quantkit.errors import UsageError
from quantkit.model.layers import KVCache
from quantkit.model.mla import MlaConfig, MlaRotaryEmbedding, MultiHeadLatentAttention

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 8,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
YARN_SKEWED = YARN | {"mscale": 0.707, "mscale_all_dim": 1.0, "factor": 4.0}  # attention factor != 1

# (name, q_lora_rank, nope, rope, v, heads, interleave, rope_parameters)
CASES = [("q-lora", 24, 16, 8, 12, 4, True, None), ("no-q-lora", None, 16, 8, 12, 4, True, None),
         ("rotate-half", 24, 8, 16, 16, 2, False, None), ("wide-rope", None, 32, 32, 8, 3, True, None),
         ("yarn", 24, 16, 8, 12, 4, True, YARN), ("yarn-skewed", None, 8, 8, 16, 2, False, YARN_SKEWED)]


def make_pair(q_lora, nope, rope, v, heads, interleave, rope_params, seed=0):
    kw = {"rope_parameters": rope_params} if rope_params else {"rope_parameters": {"rope_type": "default",
                                                                                  "rope_theta": 10000.0}}
    hf_cfg = DeepseekV3Config(hidden_size=48, num_attention_heads=heads, num_key_value_heads=heads, q_lora_rank=q_lora,
                              kv_lora_rank=20, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v,
                              rope_interleave=interleave, max_position_embeddings=64, attention_bias=False,
                              vocab_size=32, num_hidden_layers=1, **kw)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    ref = DeepseekV3Attention(hf_cfg, layer_idx=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)  # layernorm weights away from one
    cfg = MlaConfig.from_hf(hf_cfg.to_dict())
    mla = MultiHeadLatentAttention(cfg, layer_idx=0).eval()
    mla.load_state_dict(ref.state_dict(), strict=True)  # the Hub's parameter names, one to one
    return hf_cfg, ref, cfg, mla


def hf_forward(hf_cfg, ref, x, positions):
    cos, sin = DeepseekV3RotaryEmbedding(hf_cfg)(x, positions[None])
    t = x.shape[1]
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    return ref(x, (cos, sin), mask)[0]


@pytest.mark.parametrize("name, q_lora, nope, rope, v, heads, interleave, rope_params", CASES, ids=[c[0] for c in CASES])
def test_mla_matches_transformers(name, q_lora, nope, rope, v, heads, interleave, rope_params):
    hf_cfg, ref, cfg, mla = make_pair(q_lora, nope, rope, v, heads, interleave, rope_params)
    positions = torch.arange(12)  # past the yarn cases' original context (8)
    x = torch.randn(2, 12, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf_forward(hf_cfg, ref, x, positions)
        cos, sin = MlaRotaryEmbedding(cfg)(positions)
        got = mla(x, cos, sin)
    assert mla.scale == pytest.approx(ref.scaling, rel=1e-12)
    assert got.shape == want.shape == (2, 12, 48)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name, q_lora, nope, rope, v, heads, interleave, rope_params", [CASES[0], CASES[2], CASES[5]],
                         ids=[CASES[i][0] for i in (0, 2, 5)])
def test_mla_cache_decode_equals_full_recompute(name, q_lora, nope, rope, v, heads, interleave, rope_params):
    hf_cfg, ref, cfg, mla = make_pair(q_lora, nope, rope, v, heads, interleave, rope_params, seed=2)
    x = torch.randn(2, 10, 48, generator=torch.Generator().manual_seed(3))
    rot = MlaRotaryEmbedding(cfg)
    with torch.no_grad():
        full = mla(x, *rot(torch.arange(10)))
        want = hf_forward(hf_cfg, ref, x, torch.arange(10))
        cache = KVCache(1)
        steps = [(0, 5), (5, 7), (7, 8), (8, 9), (9, 10)]  # a prompt, a chunk of two, then one token at a time
        got = torch.cat([mla(x[:, a:b], *rot(torch.arange(a, b)), cache=cache) for a, b in steps], dim=1)
    assert cache.length() == 10
    assert cache.keys[0].shape == (2, heads, 10, nope + rope) and cache.values[0].shape == (2, heads, 10, v)
    assert (got - full).abs().max().item() <= 1e-5
    assert (got - want).abs().max().item() <= 1e-5


def test_mla_config_errors_are_one_line():
    base = DeepseekV3Config(hidden_size=48, num_attention_heads=4, q_lora_rank=None, kv_lora_rank=20,
                            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8).to_dict()
    with pytest.raises(UsageError, match="lacks kv_lora_rank"):
        MlaConfig.from_hf({k: v for k, v in base.items() if k != "kv_lora_rank"})
    with pytest.raises(UsageError, match="rope type 'llama3' is not supported"):
        MlaConfig.from_hf(base | {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}})
    hub_style = {k: v for k, v in base.items() if k != "rope_parameters"} | {  # the Hub config.json spelling
        "rope_theta": 10000, "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                              "mscale": 1.0, "mscale_all_dim": 1.0}}
    cfg = MlaConfig.from_hf(hub_style)
    assert cfg.yarn is not None and cfg.yarn.factor == 40 and cfg.yarn.beta_fast == 32.0


def test_mla_triton_backend_matches_torch():
    """backend 'triton' (the interpreter on CPU): the latent norms and the rotate-half RoPE as kernels."""
    pytest.importorskip("triton")
    from quantkit.kernels import dispatch

    _, _, cfg, mla = make_pair(24, 16, 8, 12, 4, True, YARN, seed=4)
    x = torch.randn(1, 6, 48, generator=torch.Generator().manual_seed(5))
    cos, sin = MlaRotaryEmbedding(cfg)(torch.arange(6))
    with torch.no_grad():
        want = mla(x, cos, sin)
        assert dispatch.set_backend(mla, "triton") == 3  # the attention and its two latent norms
        got = mla(x, cos, sin)
    assert (got - want).abs().max().item() <= 1e-5


def test_mla_at_deepseek_v3_head_dims_and_rope_far_past_the_original_context():
    """DeepSeek-V3's head dims (nope 128, rope 64, v 128) and its yarn parameters (factor 40 over 4096 positions),
    at positions past 4096 where the interpolated frequencies matter; narrow hidden and few heads keep it fast."""
    v3_yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
               "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    hf_cfg, ref, cfg, mla = make_pair(96, 128, 64, 128, 2, True, v3_yarn, seed=6)
    positions = torch.arange(5000, 5010)
    x = torch.randn(1, 10, 48, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for m in (ref, mla):  # smaller weights: 2 x 128-wide heads at std 0.3 would saturate the softmax
            for q in m.parameters():
                if q.dim() > 1:
                    q.mul_(0.3)
        want = hf_forward(hf_cfg, ref, x, positions)
        got = mla(x, *MlaRotaryEmbedding(cfg)(positions))
    assert mla.scale == pytest.approx(ref.scaling, rel=1e-12)
    assert (got - want).abs().max().item() <= 1e-5
