"""Residual-stream rotation folded into the weights: same fp logits, same architecture, loads in transformers."""

import json

import pytest
import torch

import quantkit
from quantkit.errors import UsageError
from quantkit.transforms.rotate import random_orthogonal, rotate_checkpoint


def test_orthogonal():
    Q = random_orthogonal(48, seed=3)
    torch.testing.assert_close(Q.T @ Q, torch.eye(48, dtype=torch.float64), atol=1e-12, rtol=0)
    assert not torch.allclose(Q, random_orthogonal(48, seed=4))


def test_fp_logits_unchanged_and_transformers_loads_it(tiny_dir, tmp_path):
    from transformers import Ernie4_5_MoeForCausalLM

    out = rotate_checkpoint(tiny_dir, tmp_path / "rot", seed=1)
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = quantkit.load(tiny_dir)(ids)
        after = quantkit.load(out)(ids)
        hf, info = Ernie4_5_MoeForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
        hf_logits = hf.eval()(ids).logits
    assert (after - before).abs().max().item() <= 1e-4
    assert (hf_logits - before).abs().max().item() <= 1e-4
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Ernie4_5_MoeForCausalLM"] and cfg["tie_word_embeddings"] is False
    # the transform did something: residual readers changed, norms are folded to 1
    w0 = quantkit.load(tiny_dir).model.layers[1].self_attn.q_proj.weight
    w1 = quantkit.load(out).model.layers[1].self_attn.q_proj.weight
    assert not torch.allclose(w0, w1) and torch.equal(quantkit.load(out).model.norm.weight, torch.ones(64))


def test_quantized_rotated_model_loads_in_transformers(tiny_dir, tmp_path):
    from transformers import Ernie4_5_MoeForCausalLM

    from quantkit.pipeline.quantize import QuantizeOptions, quantize
    from quantkit.quant.config import BUILTIN_RECIPES

    rot = rotate_checkpoint(tiny_dir, tmp_path / "rot")
    quantize(str(rot), tmp_path / "q", BUILTIN_RECIPES["w4g128"], QuantizeOptions(progress=False))
    ids = torch.randint(0, 320, (1, 16), generator=torch.Generator().manual_seed(1))
    hf, info = Ernie4_5_MoeForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        ours, theirs = quantkit.load(tmp_path / "q")(ids), hf.eval()(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_refuses_a_quantized_checkpoint(tiny_dir, tmp_path):
    from quantkit.pipeline.quantize import QuantizeOptions, quantize
    from quantkit.quant.config import BUILTIN_RECIPES

    quantize(str(tiny_dir), tmp_path / "q", BUILTIN_RECIPES["w4g128"], QuantizeOptions(progress=False))
    with pytest.raises(UsageError, match="is quantized"):
        rotate_checkpoint(tmp_path / "q", tmp_path / "r")
