"""Tokenizers of HF checkpoint directories: ``tokenizer.json`` (the ``tokenizers`` library) or a
SentencePiece ``tokenizer.model`` (ERNIE's Hub release ships the latter).

Text is encoded as is: no BOS/EOS are added (the perplexity protocol tokenizes the joined corpus once).
"""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import QuantkitError, UsageError


class Tokenizer:
    """``encode(str) -> list[int]`` and ``decode(list[int]) -> str`` over either backend."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as e:  # the library raises a bare Exception on malformed files
                raise QuantkitError(f"{path / 'tokenizer.json'}: cannot load ({e})") from None
            self._kind = "tokenizers"
        elif (path / "tokenizer.model").is_file():
            import sentencepiece as spm

            try:
                self._tok = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            except (OSError, RuntimeError) as e:
                raise QuantkitError(f"{path / 'tokenizer.model'}: cannot load ({e})") from None
            self._kind = "sentencepiece"
        else:
            raise UsageError(f"{path}: no tokenizer.json or tokenizer.model")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size() if self._kind == "tokenizers" else self._tok.get_piece_size()

    def encode(self, text: str) -> list[int]:
        if self._kind == "tokenizers":
            return self._tok.encode(text, add_special_tokens=False).ids
        return self._tok.encode(text)

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if self._kind == "tokenizers":
            return self._tok.decode(ids, skip_special_tokens=False)
        return self._tok.decode(ids)
