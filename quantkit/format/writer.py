"""Writing checkpoint directories: shards, index, small files, all in a temporary directory that is
renamed into place at the end, so a crash never leaves something that looks like a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from quantkit.errors import UsageError
from quantkit.model.safetensors_io import DTYPES, INDEX_FILE, SINGLE_FILE

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Files of a source checkpoint that are never copied into a new one (weights and what describes them).
NOT_COPIED = {"config.json", INDEX_FILE}
COPY_MAX_BYTES = 64 << 20


class ShardWriter:
    """Accumulates tensors and flushes a shard when it would pass ``max_bytes``.

    ``close()`` names the shards the Hugging Face way: one shard is ``model.safetensors`` with no
    index; several are ``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``.
    Returns the shard file names.
    """

    def __init__(self, out: Path, max_bytes: int, metadata: dict[str, str] | None = None):
        self.out, self.max_bytes = out, max_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[str] = []
        self.weight_map: dict[str, int] = {}
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self.weight_map or name in self.pending:
            raise ValueError(f"tensor {name} written twice")
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = t.detach().to("cpu").contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        idx = len(self.shards)
        fname = f"shard-{idx:05d}.tmp"
        save_file(self.pending, str(self.out / fname), metadata=self.metadata)
        self.weight_map.update({n: idx for n in self.pending})
        self.shards.append(fname)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = shard_names(n)
        for tmp, final in zip(self.shards, names):
            (self.out / tmp).rename(self.out / final)
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: names[i] for k, i in sorted(self.weight_map.items())}}
            (self.out / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return names


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"output {out} is not empty (use --force to replace it)")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for d in self.shape:
            n *= d
        return n


def assign_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, in order: a shard closes when the next tensor would pass the limit."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(n: int) -> list[str]:
    return [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class StreamingShards:
    """Safetensors shards whose headers are written first (all names, dtypes and shapes are known from
    the plan); each tensor's bytes then go straight to its offset, so memory holds one tensor at a time.
    """

    def __init__(self, out: Path, specs: list[TensorSpec], max_shard_bytes: int, metadata: dict[str, str] | None = None,
                 reuse: bool = False):
        """``reuse``: shards already in ``out`` with exactly this layout keep their bytes (resume)."""
        self.out = out
        self.where: dict[str, tuple[Path, int, TensorSpec]] = {}
        groups = assign_shards(specs, max_shard_bytes)
        self.files = shard_names(len(groups))
        self.total_bytes = sum(s.nbytes for s in specs)
        weight_map = {}
        for fname, group in zip(self.files, groups):
            header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
            for spec in group:
                if spec.name in self.where or spec.name in header:
                    raise ValueError(f"tensor {spec.name} planned twice")
                header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                                     "data_offsets": [offset, offset + spec.nbytes]}
                offset += spec.nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
            path = out / fname
            head = struct.pack("<Q", len(raw)) + raw
            if not (reuse and _same_layout(path, head, len(head) + offset)):
                if reuse:
                    raise RuntimeError(f"{path}: cannot resume, the shard's layout differs from this run's plan")
                with path.open("wb") as f:
                    f.write(head)
                    f.truncate(len(head) + offset)
            base = 8 + len(raw)
            for spec in group:
                self.where[spec.name] = (path, base + header[spec.name]["data_offsets"][0], spec)
                weight_map[spec.name] = fname
        self.pending = set(self.where)
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (out / INDEX_FILE).write_text(json.dumps(index, indent=2))

    def mark_written(self, names) -> None:
        """Tensors a previous (interrupted) run already wrote."""
        self.pending.difference_update(names)

    def write(self, name: str, t: torch.Tensor) -> None:
        if name not in self.where:
            raise ValueError(f"tensor {name} was not planned")
        if name not in self.pending:
            raise ValueError(f"tensor {name} written twice")
        path, offset, spec = self.where[name]
        if t.dtype != spec.dtype or tuple(t.shape) != spec.shape:
            raise ValueError(f"{name}: planned {spec.dtype} {list(spec.shape)}, got {t.dtype} {list(t.shape)}")
        data = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy() if t.numel() else b""
        with path.open("r+b") as f:
            f.seek(offset)
            f.write(memoryview(data))
        self.pending.discard(name)

    def close(self) -> dict[str, str]:
        """Check every planned tensor was written; return {shard file: sha256}."""
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} planned tensors were never written, e.g. {sorted(self.pending)[0]}")
        return {name: sha256_file(self.out / name) for name in self.files}


def _same_layout(path: Path, head: bytes, size: int) -> bool:
    if not path.is_file() or path.stat().st_size != size:
        return False
    with path.open("rb") as f:
        return f.read(len(head)) == head


class CheckpointWriter:
    """``with CheckpointWriter(out, specs, ...) as w: w.write(...); ...; w.commit()`` — nothing appears at
    ``out`` unless ``commit`` ran. The work happens in a hidden directory beside ``out``: a random one
    removed on error, or, with ``partial``, that fixed one, kept on error so a later run can resume it.
    """

    def __init__(self, out: str | Path, specs: list[TensorSpec], *, max_shard_bytes: int, force: bool = False,
                 metadata: dict[str, str] | None = None, partial: Path | None = None, reuse: bool = False):
        self.out = Path(out).expanduser().resolve()
        self.force = force
        check_output_dir(self.out, force)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.keep_on_error = partial is not None
        if partial is None:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.partial-", dir=self.out.parent))
        else:
            self.tmp = partial
            self.tmp.mkdir(exist_ok=True)
        self.committed = False
        try:
            self.shards = StreamingShards(self.tmp, specs, max_shard_bytes, metadata, reuse=reuse)
        except BaseException:
            if not self.keep_on_error:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.committed and not self.keep_on_error:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    def write(self, name: str, t: torch.Tensor) -> None:
        self.shards.write(name, t)

    def write_json(self, name: str, obj) -> None:
        (self.tmp / name).write_text(json.dumps(obj, indent=2) + "\n")

    def copy_small_files(self, src: Path) -> list[str]:
        """Tokenizer, generation config and other small non-weight files of the source."""
        copied = []
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name not in NOT_COPIED and f.suffix != ".safetensors" and f.stat().st_size <= COPY_MAX_BYTES:
                shutil.copy2(f, self.tmp / f.name)
                copied.append(f.name)
        return copied

    def commit(self) -> Path:
        check_output_dir(self.out, self.force)  # it may have been filled while we worked
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{self.tmp.name[-8:]}")
            self.out.rename(old)
        self.tmp.rename(self.out)
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.out
