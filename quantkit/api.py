"""The public Python API: ``load`` a model, ``load_tokenizer`` for it."""

from __future__ import annotations

import os

import torch

from quantkit.errors import UsageError
from quantkit.kernels import dispatch
from quantkit.model.causal_lm import MoeForCausalLM
from quantkit.model.loader import load_model
from quantkit.sources import resolve
from quantkit.tokenizer import Tokenizer

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}: use one of {', '.join(_DTYPES)}") from None


def load(src: str | os.PathLike, device: str | torch.device = "cpu", dtype=None, backend: str = "auto",
         verify: bool = True) -> MoeForCausalLM:
    """Load a model for inference.

    src: an HF checkpoint directory or a built-in name (``random:ernie-tiny``, ``demo:smollm2-moe``, ...).
    dtype: None keeps the checkpoint's dtype on a GPU and computes in float32 on the CPU (where bf16
        matmuls are slow; the bf16 values are exact in fp32); the router and its bias always stay fp32.
    backend: ``auto`` | ``torch`` | ``triton``: how quantized modules compute. ``triton`` runs the Triton
        dequant-GEMM and fused-MoE kernels (a CUDA device, or ``TRITON_INTERPRET=1`` for tests); ``torch``
        dequantizes and calls matmul; ``auto`` is triton on CUDA and torch elsewhere.
    verify: check each shard's sha256 against the one quantkit recorded when writing the checkpoint.
    Quantized (compressed-tensors pack-quantized) checkpoints load as quantized modules that hold the
    packed tensors and dequantize on the fly.
    """
    backend = dispatch.resolve(backend, device)
    dtype = _dtype(dtype)
    if dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32  # bf16 matmuls are slow on most CPUs; bf16/fp16 weights are exact in fp32
    model = load_model(resolve(src), device=device, dtype=dtype, verify=verify)
    dispatch.set_backend(model, backend)
    return model


def load_tokenizer(src: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a checkpoint directory or built-in model: ``encode(str)``, ``decode(ids)``."""
    return Tokenizer(resolve(src))
