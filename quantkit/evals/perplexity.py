"""Perplexity with the protocol GPTQ-style papers use (DESIGN.md).

Join the documents with ``"\\n\\n"``, tokenize once, cut into non-overlapping windows of ``seq_len``
tokens, PPL = exp(mean NLL over every predicted token: ``seq_len - 1`` per window).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quantkit.errors import UsageError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens
    seq_len: int
    windows: int
    model: str
    data: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def tokenize_for_windows(tokenizer, text: str, seq_len: int, max_windows: int | None) -> list[int]:
    """Token ids of ``text``; with ``max_windows`` only a prefix long enough for them is tokenized.

    A prefix of the text tokenizes like the whole text except possibly at its cut, so we tokenize a
    prefix with a margin, drop its last token, and fall back to the whole text if it came up short.
    """
    if max_windows is not None:
        need = max_windows * seq_len
        chars = need * 16 + 1024  # generous: tokens are rarely longer than 16 characters
        if chars < len(text):
            ids = tokenizer.encode(text[:chars])[:-1]
            if len(ids) >= need:
                return ids[:need]
    return tokenizer.encode(text)


@torch.no_grad()
def perplexity(
    model,
    ids: list[int] | torch.Tensor,
    seq_len: int = 2048,
    max_windows: int | None = None,
    *,
    device="cpu",
    model_name: str = "",
    data_name: str = "",
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` (``model(ids [1, T]) -> logits [1, T, V]``) over windows of ``ids``."""
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
    ids = torch.as_tensor(ids, dtype=torch.long)
    n = ids.numel() // seq_len
    if max_windows is not None:
        if max_windows < 1:
            raise UsageError(f"--max-windows must be at least 1, got {max_windows}")
        n = min(n, max_windows)
    if n == 0:
        raise UsageError(f"data {data_name!r} tokenizes to {ids.numel()} tokens, fewer than one window of {seq_len}")
    total, count = 0.0, 0
    t0 = time.perf_counter()
    bar = tqdm(range(n), desc="perplexity", unit="win", disable=not progress, leave=False)
    for w in bar:
        window = ids[w * seq_len:(w + 1) * seq_len].to(device)[None]
        logits = model(window)[0, :-1].float()
        total += F.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += seq_len - 1
        bar.set_postfix(ppl=f"{math.exp(total / count):.3f}")
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, seq_len, n, model_name, data_name, time.perf_counter() - t0)


def evaluate_perplexity(src: str, data: str, seq_len: int = 2048, max_windows: int | None = None,
                        device="cpu", dtype=None, progress: bool = True, backend: str = "auto") -> PerplexityResult:
    """Load ``src`` and its tokenizer, read ``data``, and measure perplexity."""
    import quantkit
    from quantkit.evals.data import load_text
    from quantkit.model.config import MoeConfig
    from quantkit.sources import resolve

    path = resolve(src)
    MoeConfig.from_dir(path)  # fail on a bad model before reading data
    tokenizer = quantkit.load_tokenizer(path)
    ids = tokenize_for_windows(tokenizer, load_text(data), seq_len, max_windows)
    model = quantkit.load(path, device=device, dtype=dtype, backend=backend)
    return perplexity(model, ids, seq_len, max_windows, device=device, model_name=str(src), data_name=data, progress=progress)
