"""The real-dimension random sources have their models' dimensions: at full depth, on the meta device, each one's
parameter count is the published total (model cards: Qwen3-30B-A3B 30.5B, Qwen1.5-MoE-A2.7B 14.3B, Mixtral-8x7B
46.7B, OLMoE-1B-7B 6.9B, GLM-4.5-Air 106B, DeepSeek-V2-Lite 15.7B)."""

import pytest
import torch

from quantkit.errors import UsageError
from quantkit.model.causal_lm import MoeForCausalLM
from quantkit.model.config import MoeConfig
from quantkit.sources import resolve
from quantkit.sources.random_families import REAL, family_config

PUBLISHED = {"qwen3-30b-a3b": (48, 30.5), "qwen1.5-moe-a2.7b": (24, 14.3), "mixtral-8x7b": (32, 46.7),
             "olmoe-1b-7b": (16, 6.9), "glm4.5-air": (46, 106.0), "deepseek-v2-lite": (27, 15.7)}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_sources_have_the_published_parameter_count(name):
    layers, billions = PUBLISHED[name]
    cfg = MoeConfig.from_dict(family_config(name, "bfloat16", layers))
    with torch.device("meta"):
        n = sum(p.numel() for p in MoeForCausalLM(cfg).parameters())
    assert abs(n / 1e9 - billions) / billions < 0.01, n


@pytest.mark.parametrize("spec,msg", [("random:mixtral-8x7b?layers=0", "layers must be in"),
                                      ("random:mixtral-8x7b?depth=2", "unknown option"),
                                      ("random:olmoe-1b-7b?layers=x", "must be an integer")])
def test_bad_layer_options_are_one_clear_error(spec, msg):
    with pytest.raises(UsageError, match=msg):
        resolve(spec)
