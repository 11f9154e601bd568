"""A byte-level tokenizer (3 special tokens + 256 bytes, no merges) for random-weight models.

Any UTF-8 text round-trips; ids: 0 ``<pad>``, 1 ``<s>``, 2 ``</s>``, 3.. the 256 byte symbols.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ("<pad>", "<s>", "</s>")


def build_byte_tokenizer() -> Tokenizer:
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for raw bytes
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(sorted(alphabet))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def write_byte_tokenizer(out: Path, bos_id: int, eos_id: int, pad_id: int) -> None:
    assert (pad_id, bos_id, eos_id) == (0, 1, 2), "the byte tokenizer fixes the special ids"
    build_byte_tokenizer().save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "pad_token": SPECIALS[0]}, indent=2)
    )
