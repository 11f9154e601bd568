"""Both tokenizer backends: tokenizer.json (tokenizers) and a SentencePiece tokenizer.model (ERNIE's Hub format)."""

import pytest

import quantkit
from quantkit.errors import UsageError
from quantkit.tokenizer import Tokenizer


def test_byte_level_tokenizer_roundtrips_any_text(tiny_dir):
    tok = quantkit.load_tokenizer(tiny_dir)
    text = "Fellow-Citizens 中文 ünïcode\n\n\ttabs"
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids) and tok.decode(ids) == text


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the state of the union is strong {i} times" for i in range(200)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=60,
                                   model_type="bpe", minloglevel=2)
    tok = Tokenizer(tmp_path)
    ids = tok.encode("the union is strong")
    assert ids and tok.decode(ids) == "the union is strong" and tok.vocab_size == 60


def test_no_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer(tmp_path)
