"""Calibration windows: ``n`` token windows of ``seq_len``, drawn reproducibly from a DATA spec.

DATA is any spec ``quantkit.evals.data`` understands, or several joined with ``+`` (the windows are
split evenly between them). The default for ERNIE is ``sotu:train+peoples-daily:train``: English and
Chinese, both from the ``train`` splits so that ``:test`` stays held out for perplexity.

The corpus is tokenized once, cut into non-overlapping windows, and ``n`` of them are drawn without
replacement by a seeded generator: same data, seed and tokenizer -> the same windows.
"""

from __future__ import annotations

import torch

from quantkit.errors import UsageError
from quantkit.evals.data import load_text

DEFAULT_CALIB = "sotu:train+peoples-daily:train"


def _windows_from(spec: str, tokenizer, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    text = load_text(spec)
    # enough text for every window to be a candidate, without tokenizing a huge corpus whole
    budget = max(n * seq_len * 8 * 4, 1 << 20)
    ids = torch.tensor(tokenizer.encode(text[:budget]), dtype=torch.long)
    have = ids.numel() // seq_len
    if have < n:
        raise UsageError(f"calibration data {spec!r} gives {ids.numel()} tokens: {have} windows of {seq_len}, "
                         f"fewer than the {n} asked for (lower --calib-samples or --calib-seq-len)")
    pick = torch.randperm(have, generator=gen)[:n].sort().values
    return ids[: have * seq_len].view(have, seq_len)[pick]


def calibration_windows(spec: str, tokenizer, n: int = 128, seq_len: int = 2048, seed: int = 0) -> torch.Tensor:
    """[n, seq_len] int64 token windows (see module doc)."""
    if n < 1 or seq_len < 2:
        raise UsageError(f"--calib-samples must be >= 1 and --calib-seq-len >= 2 (got {n}, {seq_len})")
    parts = [p for p in spec.split("+") if p]
    if not parts:
        raise UsageError(f"empty calibration data spec {spec!r}")
    gen = torch.Generator().manual_seed(seed)
    counts = [n // len(parts) + (i < n % len(parts)) for i in range(len(parts))]
    chunks = [_windows_from(p, tokenizer, c, seq_len, gen) for p, c in zip(parts, counts) if c]
    return torch.cat(chunks)
