"""Streaming loader: layer-at-a-time materialisation, and every malformed checkpoint is a clear error."""

import json
import shutil

import pytest
import torch

import quantkit
from quantkit.errors import QuantkitError, UsageError
from quantkit.model import Checkpoint, stream_layers
from quantkit.model.safetensors_io import CheckpointReader


@pytest.fixture
def tiny_copy(tmp_path, tiny_dir):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, dst)
    return dst


def test_stream_layers_matches_full_forward(tiny_dir):
    model = quantkit.load(tiny_dir)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    ckpt = Checkpoint(tiny_dir)
    sk = ckpt.skeleton
    ckpt.materialize(sk.model.embed_tokens, "model.embed_tokens", "cpu", torch.float32)
    ckpt.materialize(sk.model.norm, "model.norm", "cpu", torch.float32)
    h = sk.model.embed_tokens(ids)
    cos, sin = model.rope(0, 12, "cpu")
    seen = []
    for idx, layer in stream_layers(ckpt, dtype=torch.float32):
        # only the current layer is materialised
        others = [p.device.type for i, l in enumerate(sk.model.layers) if i != idx for p in l.parameters()]
        assert set(others) == {"meta"}
        h = layer(h, cos, sin)
        seen.append(idx)
    assert seen == [0, 1, 2]
    assert all(p.device.type == "meta" for p in sk.model.layers.parameters())
    logits = torch.nn.functional.linear(sk.model.norm(h), sk.model.embed_tokens.weight)
    torch.testing.assert_close(logits, model(ids), rtol=0, atol=1e-5)


def test_experts_are_3d(tiny_dir):
    model = quantkit.load(tiny_dir)
    experts = model.model.layers[1].mlp.experts
    cfg = model.config
    assert experts.gate_proj.shape == (cfg.moe_num_experts, cfg.moe_intermediate_size, cfg.hidden_size)
    assert experts.down_proj.shape == (cfg.moe_num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    bf = quantkit.load(tiny_dir, dtype="bfloat16")
    assert bf.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the router stays fp32
    assert bf.model.layers[1].mlp.moe_statics.e_score_correction_bias.dtype == torch.float32
    assert bf.model.layers[1].mlp.experts.up_proj.dtype == torch.bfloat16


def test_missing_dir_and_config(tmp_path):
    with pytest.raises(UsageError, match="no such directory"):
        quantkit.load(tmp_path / "nope")
    with pytest.raises(UsageError, match="no config.json"):
        quantkit.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UsageError, match="invalid JSON"):
        quantkit.load(tmp_path)


def test_unsupported_architecture(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    cfg.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="unsupported architecture LlamaForCausalLM"):
        quantkit.load(tiny_copy)


def test_missing_config_key(tiny_copy):
    cfg = json.loads((tiny_copy / "config.json").read_text())
    del cfg["hidden_size"]
    (tiny_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="hidden_size"):
        quantkit.load(tiny_copy)


def test_truncated_shard(tiny_copy):
    f = tiny_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(QuantkitError, match="truncated"):
        quantkit.load(tiny_copy)


def test_missing_shard_and_missing_or_unknown_tensor(tmp_path):
    from hf_reference import make_hf_model

    make_hf_model().save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert isinstance(CheckpointReader(tmp_path).names(), list)

    # a tensor named by the index moved to a different shard name -> not found in its shard
    name = next(iter(index["weight_map"]))
    bad = json.loads(json.dumps(index))
    bad["weight_map"]["model.layers.0.extra.weight"] = bad["weight_map"][name]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(bad))
    with pytest.raises(QuantkitError, match="not in their shard"):
        quantkit.load(tmp_path)

    # a tensor missing from the checkpoint
    bad = json.loads(json.dumps(index))
    gone = "model.layers.1.mlp.experts.3.up_proj.weight"
    del bad["weight_map"][gone]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(bad))
    # the shard still holds it, but the index no longer names it: it is missing, not silently random
    with pytest.raises(QuantkitError, match="missing from the checkpoint"):
        quantkit.load(tmp_path)

    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    shard = tmp_path / index["weight_map"][name]
    shard.unlink()
    with pytest.raises(QuantkitError, match="is missing"):
        quantkit.load(tmp_path)


def test_unknown_tensor_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    from hf_reference import make_hf_model

    make_hf_model().save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
    tensors["mtp_block.0.weight"] = torch.zeros(2)  # mtp tensors are known and ignored
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(QuantkitError, match="unknown tensors.*surprise"):
        quantkit.load(tmp_path)
    del tensors["model.layers.0.mlp.surprise.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    quantkit.load(tmp_path)


def test_bad_random_names():
    with pytest.raises(UsageError, match="unknown random model"):
        quantkit.load("random:nope")
    with pytest.raises(UsageError, match="layers must be"):
        quantkit.load("random:ernie-21b-a3b?layers=x")
    with pytest.raises(UsageError, match="unknown option"):
        quantkit.load("random:ernie-21b-a3b?layer=2")
