"""Architecture specs: family lookup, config mapping, the canonical <-> Hub name map, and bad input."""

import re
import subprocess
import sys

import pytest

from quantkit.errors import UsageError
from quantkit.model.arch import SPECS, get_spec
from quantkit.model.arch.spec import (
    always_ignored,
    hub_prefixes,
    hub_regex,
    hub_tensors,
)
from quantkit.model.config import MoeConfig
from quantkit.sources.random_families import TINY, family_config
from quantkit.sources.random_models import ERNIE_TINY, hf_config


def test_unsupported_architecture_lists_the_supported_ones():
    with pytest.raises(UsageError) as e:
        MoeConfig.from_dict({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8})
    msg = str(e.value)
    assert "unsupported architecture LlamaForCausalLM" in msg
    for spec in SPECS.values():
        assert spec.architectures[0] in msg


@pytest.mark.parametrize("source,key", [("qwen2-moe-tiny", "shared_expert_intermediate_size"),
                                        ("mixtral-tiny", "num_local_experts"), ("glm4-moe-tiny", "n_routed_experts"),
                                        ("qwen3-moe-tiny", "num_experts")])
def test_a_required_key_missing_is_one_error_naming_it(source, key):
    d = family_config(source, "float32")
    del d[key]
    with pytest.raises(UsageError, match=f"lacks the required key '{key}'"):
        MoeConfig.from_dict(d)


def test_an_unsupported_value_is_named():
    d = family_config("mixtral-tiny", "float32")
    d["sliding_window"] = 128
    with pytest.raises(UsageError, match="sliding_window=128 is not supported"):
        MoeConfig.from_dict(d)


def test_bad_config_through_the_cli_is_one_line(tmp_path):
    import json

    d = family_config("olmoe-tiny", "float32")
    del d["num_experts_per_tok"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    r = subprocess.run([sys.executable, "-m", "quantkit.cli", "inspect", str(tmp_path)], capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "lacks the required key 'num_experts_per_tok'" in r.stderr


@pytest.mark.parametrize("source", sorted(TINY))
def test_family_configs_map_to_the_families_fields(source):
    cfg = MoeConfig.from_dict(family_config(source, "float32"))
    assert cfg.arch == TINY[source][0] and cfg.spec is get_spec(cfg.arch)
    assert cfg.moe_num_experts == 8 and cfg.moe_k == 2 and cfg.rope_style == "half"
    expected_moe = {"qwen3-moe-tiny": [1, 2], "qwen2-moe-tiny": [1, 2], "mixtral-tiny": [0, 1, 2], "olmoe-tiny": [0, 1, 2],
                    "glm4-moe-tiny": [1, 2], "deepseek-v3-tiny": [1, 2]}[source]
    assert cfg.moe_layers == expected_moe


def test_glm_and_qwen2_specific_fields():
    glm = MoeConfig.from_dict(family_config("glm4-moe-tiny", "float32"))
    assert (glm.rotary_dim, glm.router_scoring, glm.qk_norm, glm.qkv_bias, glm.o_bias) == (8, "sigmoid", "head", True, False)
    assert (glm.router_spec.n_group, glm.router_spec.routed_scaling_factor, glm.shared_width) == (2, 2.5, 32)
    q2 = MoeConfig.from_dict(family_config("qwen2-moe-tiny", "float32"))
    assert (q2.shared_width, q2.shared_expert_gate, q2.qkv_bias, q2.o_bias, q2.router_bias) == (64, True, True, False, False)


def test_ernie_maps_to_itself():
    cfg = MoeConfig.from_dict(hf_config(ERNIE_TINY, "float32"))
    s = cfg.spec
    assert s.name == "ernie" and cfg.rope_style == "interleaved" and cfg.router_spec.norm_min == 1e-12
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.1.mlp.shared_experts.up_proj", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.mlp.moe_statics.e_score_correction_bias"):
        assert hub_tensors(s, name, 8) == [name]
    assert hub_tensors(s, "model.layers.1.mlp.experts.up_proj", 2) == [
        "model.layers.1.mlp.experts.0.up_proj.weight", "model.layers.1.mlp.experts.1.up_proj.weight"]
    assert always_ignored(s) == ["lm_head", r"re:.*\.mlp\.gate$"]  # what ERNIE checkpoints always had


def test_mixtral_and_qwen2_names():
    m, q2, glm = get_spec("mixtral"), get_spec("qwen2_moe"), get_spec("glm4_moe")
    assert hub_prefixes(m, "model.layers.3.mlp.experts.down_proj", 2) == [
        "model.layers.3.block_sparse_moe.experts.0.w2", "model.layers.3.block_sparse_moe.experts.1.w2"]
    assert hub_tensors(m, "model.layers.3.mlp.experts.gate_proj.weight_scale", 1) == [
        "model.layers.3.block_sparse_moe.experts.0.w1.weight_scale"]
    assert hub_tensors(m, "model.layers.3.mlp.gate.weight", 8) == ["model.layers.3.block_sparse_moe.gate.weight"]
    rx = hub_regex(m, "model.layers.3.mlp.experts.up_proj")[3:]
    assert re.match(rx, "model.layers.3.block_sparse_moe.experts.17.w3") and not re.match(rx, "model.layers.3.block_sparse_moe.experts.1.w1")
    assert hub_prefixes(q2, "model.layers.0.mlp.shared_experts.gate_proj", 4) == ["model.layers.0.mlp.shared_expert.gate_proj"]
    assert hub_prefixes(q2, "model.layers.0.mlp.shared_expert_gate", 4) == ["model.layers.0.mlp.shared_expert_gate"]
    assert r"re:.*\.mlp\.shared_expert_gate$" in always_ignored(q2)
    assert hub_tensors(glm, "model.layers.1.mlp.moe_statics.e_score_correction_bias", 8) == [
        "model.layers.1.mlp.gate.e_score_correction_bias"]


def _add_tensor(src, dst, name):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    t = load_file(str(dst / "model.safetensors"))
    t[name] = torch.zeros(4)
    save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_glm_mtp_layer_is_ignored_other_unknown_tensors_are_not(tmp_path):
    import quantkit
    from quantkit.errors import QuantkitError
    from quantkit.sources import resolve

    glm = _add_tensor(resolve("random:glm4-moe-tiny"), tmp_path / "glm", "model.layers.3.eh_proj.weight")  # MTP layer
    assert quantkit.load(glm).config.num_hidden_layers == 3
    mix = _add_tensor(resolve("random:mixtral-tiny"), tmp_path / "mix", "model.layers.3.eh_proj.weight")
    with pytest.raises(QuantkitError, match="1 unknown tensors"):
        quantkit.load(mix)


def test_fastdeploy_export_and_rotation_refuse_other_families(tmp_path):
    from quantkit.format import fastdeploy
    from quantkit.quant.config import get_recipe
    from quantkit.sources import resolve
    from quantkit.transforms.rotate import rotate_checkpoint

    cfg = MoeConfig.from_dict(family_config("mixtral-tiny", "float32"))
    with pytest.raises(UsageError, match="for ERNIE-4.5-MoE, not MixtralForCausalLM"):
        fastdeploy.plan(cfg, get_recipe("w2code"))
    with pytest.raises(UsageError, match="ERNIE-4.5-MoE checkpoints only, not qwen2_moe"):
        rotate_checkpoint(resolve("random:qwen2-moe-tiny"), tmp_path / "rot")
