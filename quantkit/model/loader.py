"""Streaming loader: build on the meta device, materialise only what is asked for.

Which checkpoint tensors make up which module parameter is the family's name map (``ArchSpec.names``, applied by
``arch.spec.hub_tensors``): in memory quantkit's canonical names, on disk the Hub's; the routed experts are stored
per expert on disk (``mlp.experts.{e}.gate_proj.weight``, Mixtral ``block_sparse_moe.experts.{e}.w1.weight``)
and held as one 3-D ``[E, N, K]`` parameter in memory.

Typical uses:
    model = load_model(path, device, dtype)               # everything, for inference
    for idx, layer in stream_layers(ckpt, device, dtype):  # one decoder layer at a time
        ...                                               # the layer is freed when the loop moves on
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.model.arch.spec import hub_tensors
from quantkit.model.causal_lm import MoeForCausalLM, rotary_embedding
from quantkit.model.config import MoeConfig
from quantkit.model.safetensors_io import CheckpointReader

LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
# Parameters kept in fp32 whatever the model dtype (the router and its bias).
FP32_PARAMS = re.compile(r"\.mlp\.gate\.weight$|\.moe_statics\.e_score_correction_bias$")
# Tensors kept exactly as stored: quantization scales (dequantization must match the writer's).
KEEP_DTYPE = re.compile(r"\.(weight_scale|super_scales|code_scale|code_zp)$")


def source_names(param: str, cfg: MoeConfig) -> list[str]:
    """Checkpoint tensor names that make up module parameter ``param`` (one, or one per expert), through the
    family's name map. In memory ``experts.gate_proj`` (3-D) or ``experts.gate_proj.weight_packed`` (quantized,
    stacked); on disk per expert (ERNIE's earlier FastDeploy-style ``experts.{e}.up_gate_proj`` too)."""
    return hub_tensors(cfg.spec, param, cfg.moe_num_experts)


def ignored_tensor(name: str, cfg: MoeConfig) -> bool:
    """Checkpoint tensors that exist in some releases and that the model does not use (``mtp*``, GLM's MTP layer)."""
    if re.search(cfg.spec.ignored_tensors, name):
        return True
    m = LAYER_INDEX.match(name)
    return bool(m and cfg.spec.extra_layers_ignored and int(m.group(1)) >= cfg.num_hidden_layers)


def default_dtype(cfg: MoeConfig) -> torch.dtype:
    name = cfg.raw.get("torch_dtype") or cfg.raw.get("dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name).replace("torch.", ""), torch.float32)


class Checkpoint:
    """An opened HF checkpoint directory: config, tensor reader and the meta-device skeleton."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.config = MoeConfig.from_dir(self.path)
        self.reader = CheckpointReader(self.path)
        if verify:
            verify_checksums(self.path)
        self.qconfig = self.config.raw.get("quantization_config")
        self.skeleton = build_skeleton(self.config, self.qconfig, self.reader, self.path)
        check_names(self.skeleton, self.config, self.reader.names(), self.path)

    def read_param(self, param: str, dtype: torch.dtype) -> torch.Tensor:
        """Read one module parameter (experts are stacked into [E, N, K]) and cast it for use."""
        names = source_names(param, self.config)
        if len(names) == 1:
            t = self.reader.read(names[0])
        else:
            first = self.reader.info(names[0])
            t = torch.empty((len(names), *first.shape), dtype=first.dtype)
            for e, name in enumerate(names):
                info = self.reader.info(name)
                if info.shape != first.shape or info.dtype != first.dtype:
                    raise QuantkitError(f"{name}: shape/dtype {list(info.shape)} {info.dtype} differs from expert 0")
                self.reader.read_into(name, t[e])
        if not t.dtype.is_floating_point or KEEP_DTYPE.search(param):
            return t
        return t.to(torch.float32 if FP32_PARAMS.search(param) else dtype)

    def materialize(self, module: nn.Module, prefix: str, device, dtype: torch.dtype) -> nn.Module:
        """Fill every parameter of ``module`` (named ``prefix`` in the model) from the checkpoint, in place."""
        for name, p in model_tensors(module):
            full = f"{prefix}.{name}" if prefix else name
            t = self.read_param(full, dtype)
            if full.endswith("e_score_correction_bias") and t.numel() == p.numel():
                t = t.reshape(p.shape)  # ERNIE: [1, E] on the Hub, [E] in some conversions
            if tuple(t.shape) != tuple(p.shape):
                raise QuantkitError(f"{full}: checkpoint shape {list(t.shape)} != model shape {list(p.shape)} (config mismatch?)")
            owner, leaf = _owner(module, name)
            if leaf in owner._buffers:
                owner._buffers[leaf] = t.to(device)
            else:
                owner._parameters[leaf] = nn.Parameter(t.to(device), requires_grad=False)
        return module


def build_skeleton(config: MoeConfig, qconfig: dict | None, reader, where) -> MoeForCausalLM:
    """The model on the meta device, with quantized modules swapped in where the checkpoint stores them.
    ``reader`` needs ``names()``, ``in`` and ``info(name).shape/.dtype`` (a ``CheckpointReader``, or the
    header-only view ``quantkit check`` uses)."""
    if qconfig is not None and qconfig.get("quantization") == "wint2" and "quant_method" not in qconfig:
        raise QuantkitError(f"{where}: a FastDeploy wint2 export (ernie.* names, Paddle layouts) is for FastDeploy; "
                            "quantkit loads its own layout (quantize with --export quantkit)")
    if qconfig is not None and qconfig.get("quant_method") != "compressed-tensors":
        raise QuantkitError(f"{where}: quantization method {qconfig.get('quant_method')!r} is not supported "
                            "(quantkit reads compressed-tensors pack-quantized checkpoints)")
    with torch.device("meta"):
        skeleton = MoeForCausalLM(config)
        if qconfig is not None:
            from quantkit.nn.swap import swap_quantized_modules

            swap_quantized_modules(skeleton, config, qconfig, reader)
    # the RoPE table is computed, not loaded: give the skeleton a real one (a few KB)
    skeleton.rotary = rotary_embedding(config)
    return skeleton


def expected_tensors(skeleton: nn.Module, config: MoeConfig) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every checkpoint tensor the skeleton reads, with the dtype and shape its parameter holds (experts: one
    tensor per expert, of the stacked parameter's shape without its first dimension)."""
    out = {}
    for param, t in model_tensors(skeleton):
        names = source_names(param, config)
        for n in names:
            out[n] = (t.dtype, tuple(t.shape[1:]) if len(names) > 1 else tuple(t.shape))
    return out


def check_names(skeleton: nn.Module, config: MoeConfig, names, where) -> None:
    """Every parameter has its tensors and every tensor has a parameter: never silently random."""
    expected = set(expected_tensors(skeleton, config))
    present = {n for n in names if not ignored_tensor(n, config)}
    if config.tie_word_embeddings:
        present.discard("lm_head.weight")
    missing, unknown = sorted(expected - present), sorted(present - expected)
    if missing:
        raise QuantkitError(f"{where}: {len(missing)} tensors missing from the checkpoint, e.g. {missing[0]}")
    if unknown:
        raise QuantkitError(f"{where}: {len(unknown)} unknown tensors in the checkpoint, e.g. {unknown[0]}")


def model_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers: everything that comes from the checkpoint."""
    out = list(module.named_parameters())
    for name, b in module.named_buffers():
        owner, leaf = _owner(module, name)
        if leaf not in owner._non_persistent_buffers_set:
            out.append((name, b))
    return out


def verify_checksums(path: Path) -> None:
    """Compare each shard's sha256 with the one quantkit recorded when writing (if it did)."""
    from quantkit.format.compressed_tensors import METADATA_FILE
    from quantkit.format.writer import sha256_file

    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        return
    import json

    shards = json.loads(meta_file.read_text()).get("shards", {})
    for name, digest in shards.items():
        f = path / name
        if not f.is_file():
            raise QuantkitError(f"{path}: shard {name} is missing")
        if sha256_file(f) != digest:
            raise QuantkitError(f"{f}: sha256 mismatch (corrupt or modified shard; re-create it, or load with verify=False)")


def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, leaf = dotted.split(".")
    for p in path:
        module = getattr(module, p)
    return module, leaf


def release(module: nn.Module) -> None:
    """Return a materialised module's memory by moving its tensors back to the meta device."""
    module.to("meta")


def load_model(path: str | Path, device="cpu", dtype: torch.dtype | None = None, verify: bool = True) -> MoeForCausalLM:
    """The whole model, materialised on ``device`` (dtype: the checkpoint's unless given)."""
    ckpt = Checkpoint(path, verify=verify)
    dtype = dtype or default_dtype(ckpt.config)
    model = ckpt.materialize(ckpt.skeleton, "", device, dtype)
    model.rotary.to(device)
    return model.eval()


def stream_layers(ckpt: Checkpoint, device="cpu", dtype: torch.dtype | None = None, start: int = 0) -> Iterator[tuple[int, nn.Module]]:
    """Yield ``(idx, decoder_layer)`` for idx >= ``start``, materialised one at a time; each is released
    when the next is asked for."""
    dtype = dtype or default_dtype(ckpt.config)
    for idx, layer in enumerate(ckpt.skeleton.model.layers):
        if idx < start:
            continue
        ckpt.materialize(layer, f"model.layers.{idx}", device, dtype)
        try:
            yield idx, layer
        finally:
            release(layer)
