"""The calibration hidden states between layers: in memory while they fit a budget, on disk beyond it.

A store holds one generation (the inputs of the current layer) as a list of batches ``[b, T, H]``.
``map(fn)`` runs ``fn`` over the batches in order and returns the next generation; batches that would
pass ``budget_bytes`` are written to ``dir/g{generation}-{i}.pt`` and read back one at a time, so
memory holds about the budget plus one batch whatever the calibration set's size. ``persist()`` writes
the in-memory batches too, so that an interrupted run can reopen the generation (resume).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch


class HiddenStore:
    def __init__(self, directory: Path, budget_bytes: int, device, generation: int = 0):
        self.dir, self.budget, self.device, self.generation = Path(directory), budget_bytes, device, generation
        self.items: list[torch.Tensor | Path] = []
        self.in_memory = 0

    def _path(self, i: int) -> Path:
        return self.dir / f"g{self.generation}-{i}.pt"

    def append(self, t: torch.Tensor) -> None:
        if self.in_memory + t.numel() * t.element_size() <= self.budget:
            self.items.append(t)
            self.in_memory += t.numel() * t.element_size()
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._path(len(self.items))
        torch.save(t.cpu(), path)
        self.items.append(path)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for it in self.items:
            yield torch.load(it, map_location=self.device) if isinstance(it, Path) else it

    @property
    def spilled(self) -> int:
        return sum(isinstance(it, Path) for it in self.items)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor], drop: bool = True) -> "HiddenStore":
        """The next generation; ``drop=False`` keeps this one (and its files) until the caller drops it."""
        nxt = HiddenStore(self.dir, self.budget, self.device, self.generation + 1)
        for h in self:
            nxt.append(fn(h))
        if drop:
            self.drop()
        return nxt

    def drop(self) -> None:
        """Forget this generation and delete its files (spilled or persisted)."""
        for i in range(len(self.items)):
            self._path(i).unlink(missing_ok=True)
        self.items, self.in_memory = [], 0

    def persist(self) -> dict:
        """Write every batch to disk (resumable); return what ``reopen`` needs."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for i, it in enumerate(self.items):
            if not isinstance(it, Path) and not self._path(i).exists():
                tmp = self._path(i).with_suffix(".tmp")
                torch.save(it.cpu(), tmp)
                tmp.replace(self._path(i))
        return {"generation": self.generation, "batches": len(self.items)}

    @classmethod
    def reopen(cls, directory: Path, budget_bytes: int, device, info: dict) -> "HiddenStore":
        store = cls(directory, budget_bytes, device, info["generation"])
        store.items = [store._path(i) for i in range(info["batches"])]
        return store
