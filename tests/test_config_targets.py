"""Every ``targets`` / ``ignore`` entry of a quantkit checkpoint's ``quantization_config`` names real modules,
and every quantized module falls under exactly one target, as vLLM matches them.

vLLM's compressed-tensors ``find_matched_target`` / ``should_ignore_layer`` rule, re-stated here as the
reference (vllm/model_executor/layers/quantization/compressed_tensors/utils.py): a ``re:`` entry matches
with ``re.match`` on the module name; any other entry matches the exact module name or the class name
(quantkit never writes class targets; ``Linear`` would match every linear). Modules are the checkpoint's
on-disk modules (tensor names less their leaf) plus ``lm_head``, which the model has even when tied.
"""

import json
import re
from pathlib import Path

import pytest

from hf_reference import make_hf_model
from quantkit.model.safetensors_io import CheckpointReader
from quantkit.pipeline.quantize import QuantizeOptions, quantize
from quantkit.quant.config import get_recipe

QUANT_LEAVES = ("weight_packed",)
CODE2_LEAF = "quant_weight"


def vllm_matches(entry: str, module: str, cls: str = "Linear") -> bool:
    if entry.startswith("re:"):
        return re.match(entry[3:], module) is not None
    return entry == module or entry == cls


def modules_of(path: Path) -> dict[str, set[str]]:
    """on-disk module name -> its tensor leaves"""
    out: dict[str, set[str]] = {}
    for name in CheckpointReader(path).names():
        module, _, leaf = name.rpartition(".")
        out.setdefault(module, set()).add(leaf)
    out.setdefault("lm_head", {"weight"})
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_dir):
    root = tmp_path_factory.mktemp("targets")
    k64 = root / "k64"  # experts with K = 64, which the 2-bit code needs
    make_hf_model(hidden_size=64, intermediate_size=64, moe_intermediate_size=64).save_pretrained(k64)
    out = {}
    for case, src, recipe, export in [("w4g128", tiny_dir, "w4g128", "quantkit"), ("w8", tiny_dir, "w8", "quantkit"),
                                      ("w2code", k64, "w2code", "quantkit")]:
        quantize(str(src), root / case, get_recipe(recipe), QuantizeOptions(progress=False, export=export))
        out[case] = root / case
    return out


# (--export fastdeploy writes FastDeploy's own quantization keys, not a compressed-tensors config: nothing to match)
CASES = ["w4g128", "w8", "w2code"]


@pytest.mark.parametrize("case", CASES)
def test_every_entry_matches_a_module_and_every_quantized_module_one_target(ckpts, case):
    path = ckpts[case]
    q = json.loads((path / "config.json").read_text())["quantization_config"]
    mods = modules_of(path)
    targets = [t for g in q["config_groups"].values() for t in g["targets"]]
    ignore = q["ignore"]
    for entry in targets + ignore:
        assert any(vllm_matches(entry, m) for m in mods), f"{entry!r} matches no module of the checkpoint"
    quantized = [m for m, leaves in mods.items() if leaves & set(QUANT_LEAVES)]
    assert quantized
    for m in quantized:
        hits = [t for t in targets if vllm_matches(t, m)]
        assert len(hits) == 1, f"{m}: matched by {hits}"
        assert not any(vllm_matches(i, m) for i in ignore), f"{m} is quantized but ignored"
    # linears stored otherwise (full precision, or in the 2-bit code) must not look pack-quantized to vLLM
    for m, leaves in mods.items():
        if m in quantized or not ({"weight", CODE2_LEAF} & leaves) or m.endswith(("norm", "embed_tokens", "layernorm")):
            continue
        if any(vllm_matches(t, m) for t in targets):
            assert any(vllm_matches(i, m) for i in ignore), f"{m}: matched by a target, not quantized, not ignored"
    if case.startswith("w2code"):
        code2 = [m for m, leaves in mods.items() if CODE2_LEAF in leaves]
        assert code2 and all(any(vllm_matches(i, m) for i in ignore) for m in code2)
