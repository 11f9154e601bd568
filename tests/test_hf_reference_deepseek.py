"""The tiny DeepSeek-V3 / GLM-4.5 references (``hf_reference_deepseek``) build, run, save (whole and sharded) and load
back with the same logits, and the names transformers 5.24's ``save_pretrained`` writes are the Hub layout the
architecture specs must map: per-expert ``mlp.experts.{e}.{gate,up,down}_proj.weight``, ``mlp.gate.weight`` and
``mlp.gate.e_score_correction_bias`` (fp32), ``mlp.shared_experts.*``, a dense ``mlp.*`` before
``first_k_dense_replace``, MLA's ``self_attn.q_a_proj / q_a_layernorm / q_b_proj`` (or ``q_proj``),
``kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj``, and no ``lm_head`` when tied."""

import pytest
import torch
from hf_reference_deepseek import (
    DEEPSEEK_VARIANTS,
    GLM_VARIANTS,
    make_deepseek_model,
    make_glm_model,
    name_patterns,
    on_disk_names,
    save,
)

L = "model.layers.{L}."
TOP = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
NORMS = {L + "input_layernorm.weight", L + "post_attention_layernorm.weight"}
DENSE = {L + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
MOE = ({L + f"mlp.experts.{{e}}.{p}_proj.weight" for p in ("gate", "up", "down")}
       | {L + f"mlp.shared_experts.{p}_proj.weight" for p in ("gate", "up", "down")}
       | {L + "mlp.gate.weight", L + "mlp.gate.e_score_correction_bias"})
MLA = {L + f"self_attn.{n}.weight" for n in ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj")}
MLA_Q_LORA = {L + f"self_attn.{n}.weight" for n in ("q_a_proj", "q_a_layernorm", "q_b_proj")}
GQA_BIAS = ({L + f"self_attn.{p}_proj.{w}" for p in ("q", "k", "v") for w in ("weight", "bias")}
            | {L + "self_attn.o_proj.weight"})


def expected(cfg, attn: set) -> set[str]:
    layers = attn | NORMS | (DENSE if cfg.first_k_dense_replace > 0 else set())
    layers |= MOE if cfg.num_hidden_layers > cfg.first_k_dense_replace else set()
    return layers | (TOP - {"lm_head.weight"} if cfg.tie_word_embeddings else TOP)


def round_trip(model, tmp_path, shard):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    path = save(model, tmp_path / "m", shard)
    names = on_disk_names(path)
    with torch.no_grad():
        again = AutoModelForCausalLM.from_pretrained(path).eval()(ids).logits
    assert torch.isfinite(logits).all() and torch.equal(logits, again)
    return names


@pytest.mark.parametrize("variant", list(DEEPSEEK_VARIANTS))
def test_deepseek_reference_saves_the_hub_layout(variant, tmp_path):
    model = make_deepseek_model(variant)
    names = round_trip(model, tmp_path, "40KB" if variant == "base" else None)
    cfg = model.config
    attn = MLA | (MLA_Q_LORA if cfg.q_lora_rank is not None else {L + "self_attn.q_proj.weight"})
    assert name_patterns(names) == expected(cfg, attn)
    dense, moe = f"model.layers.{cfg.first_k_dense_replace - 1}.", f"model.layers.{cfg.first_k_dense_replace}."
    e, hdim, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert names[moe + "mlp.gate.e_score_correction_bias"] == ((e,), "F32")
    assert names[moe + f"mlp.experts.{e - 1}.down_proj.weight"][0] == (hdim, inter)
    assert names[moe + "mlp.shared_experts.gate_proj.weight"][0] == (inter * cfg.n_shared_experts, hdim)
    assert names[moe + "self_attn.kv_a_proj_with_mqa.weight"][0] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim, hdim)
    assert names[moe + "self_attn.kv_b_proj.weight"][0] == (
        cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
    if cfg.first_k_dense_replace:
        assert names[dense + "mlp.gate_proj.weight"][0] == (cfg.intermediate_size, hdim)


@pytest.mark.parametrize("variant", list(GLM_VARIANTS))
def test_glm_reference_saves_the_hub_layout(variant, tmp_path):
    model = make_glm_model(variant)
    names = round_trip(model, tmp_path, "40KB" if variant == "base" else None)
    cfg = model.config
    attn = GQA_BIAS | ({L + "self_attn.q_norm.weight", L + "self_attn.k_norm.weight"} if cfg.use_qk_norm else set())
    assert name_patterns(names) == expected(cfg, attn)
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5  # GLM's partial rotary, as config.json has it


@pytest.mark.parametrize("variant", ["base", "no-q-lora", "rotate-half", "yarn"])
def test_mla_matches_every_layer_of_a_saved_model(variant, tmp_path):
    """Inside a whole saved DeepSeek-V3 reference: ``MlaConfig.from_hf`` reads the config.json transformers wrote,
    each layer's ``self_attn.*`` tensors load into ``MultiHeadLatentAttention`` by name, and it gives that layer's
    attention output on the input the layer actually saw (fp32, <= 1e-5)."""
    import json

    from safetensors.torch import load_file

    from quantkit.model.mla import (
        MlaConfig,
        MlaRotaryEmbedding,
        MultiHeadLatentAttention,
    )

    model = make_deepseek_model(variant, seed=3)
    path = save(model, tmp_path / "m")
    cfg = MlaConfig.from_hf(json.loads((path / "config.json").read_text()))
    tensors = load_file(path / "model.safetensors")
    seen = {}
    hooks = [layer.self_attn.register_forward_hook(
        lambda mod, args, kwargs, out, i=i: seen.__setitem__(i, (kwargs["hidden_states"], out[0])), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)]
    t = 12
    ids = torch.randint(0, model.config.vocab_size, (2, t), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(ids)
        cos, sin = MlaRotaryEmbedding(cfg)(torch.arange(t))
        for i in range(model.config.num_hidden_layers):
            mla = MultiHeadLatentAttention(cfg, layer_idx=i).eval()
            prefix = f"model.layers.{i}.self_attn."
            mla.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=True)
            x, want = seen[i]
            assert (mla(x, cos, sin) - want).abs().max().item() <= 1e-5
    for h in hooks:
        h.remove()
