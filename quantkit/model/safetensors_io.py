"""Reading tensors from single-file or sharded safetensors checkpoints, one tensor at a time.

The safetensors layout is simple: 8 bytes little-endian header length, a JSON header mapping names to
``{dtype, shape, data_offsets}``, then the data. We parse the header ourselves and ``readinto`` each
tensor's bytes straight into its destination, so
  * memory holds only what was asked for (no mmap'd pages counted in the process' RSS),
  * a missing or truncated shard is found when the checkpoint is opened, before any work is done,
  * a 3-D expert tensor is filled slice by slice without an intermediate copy.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import QuantkitError, UsageError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse one safetensors file's header; check that the file holds every byte the header promises."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise QuantkitError(f"{path}: truncated safetensors file ({size} bytes)")
            (hlen,) = struct.unpack("<Q", raw)
            if hlen > min(size - 8, 100 << 20):
                raise QuantkitError(f"{path}: corrupt safetensors header (length {hlen}, file {size} bytes)")
            header = json.loads(f.read(hlen))
    except OSError as e:
        raise QuantkitError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QuantkitError(f"{path}: corrupt safetensors header") from None
    meta = header.pop("__metadata__", None) or {}
    base = 8 + hlen
    infos: dict[str, TensorInfo] = {}
    for name, h in header.items():
        if h["dtype"] not in DTYPES:
            raise QuantkitError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
        s, e = h["data_offsets"]
        infos[name] = TensorInfo(path, DTYPES[h["dtype"]], tuple(h["shape"]), base + s, base + e)
    need = max((i.end for i in infos.values()), default=base)
    if size < need:
        raise QuantkitError(f"{path}: truncated shard ({size} bytes, its header needs {need})")
    return infos, meta


class CheckpointReader:
    """Name -> tensor access over ``model.safetensors`` or a sharded ``model.safetensors.index.json``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"{index}: invalid index (expected a 'weight_map' object)") from None
            files = sorted(set(weight_map.values()))
        elif (self.path / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise UsageError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE}")
        self.infos: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        for fname in files:
            fpath = self.path / fname
            if not fpath.is_file():
                raise QuantkitError(f"{self.path}: shard {fname} named in the index is missing")
            infos, meta = read_header(fpath)
            self.metadata[fname] = meta
            for name, info in infos.items():
                if weight_map is not None and weight_map.get(name) != fname:
                    continue  # the index is authoritative about where a tensor lives
                self.infos[name] = info
        if weight_map is not None:
            missing = sorted(set(weight_map) - set(self.infos))
            if missing:
                raise QuantkitError(f"{self.path}: {len(missing)} tensors named in the index are not in their shard, e.g. {missing[0]}")

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise QuantkitError(f"{self.path}: tensor {name} not found") from None

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Fill the contiguous CPU tensor ``out`` (same dtype and numel as on disk) with the stored bytes."""
        info = self.info(name)
        if out.dtype != info.dtype or out.numel() != _numel(info.shape) or not out.is_contiguous():
            raise QuantkitError(f"{name}: stored as {info.dtype} {list(info.shape)}, cannot read into {out.dtype} {list(out.shape)}")
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        if buf is not None:
            with info.file.open("rb") as f:
                f.seek(info.start)
                if f.readinto(memoryview(buf)) != info.nbytes:
                    raise QuantkitError(f"{info.file}: truncated while reading {name}")
        return out

    def read(self, name: str) -> torch.Tensor:
        info = self.info(name)
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
