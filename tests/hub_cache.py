"""Lay out a checkpoint directory in a Hugging Face Hub cache exactly as huggingface_hub does when it
downloads a repo (it has no public API that fills the cache without the network):

    HF_HUB_CACHE/models--ORG--NAME/
        blobs/<git sha1 of the file, or sha256 for LFS files (weights)>     the bytes, once
        refs/<branch or tag>                                                  the commit hash (no newline)
        snapshots/<commit hash>/<file> -> ../../blobs/<hash>                  relative symlinks
"""

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".model")  # stored through git-lfs on the Hub: blob named by sha256


def _blob_name(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in LFS_SUFFIXES:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


def add_snapshot(cache: Path, repo_id: str, src: Path, commit: str, refs: tuple[str, ...] = ("main",),
                 skip: tuple[str, ...] = ()) -> Path:
    """Put every file of directory ``src`` (except ``skip``) into ``cache`` as snapshot ``commit`` of
    ``repo_id``, pointed to by each of ``refs``; returns the snapshot directory."""
    repo_dir = Path(cache) / ("models--" + repo_id.replace("/", "--"))
    snap = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    snap.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.name in skip:
            continue
        blob = repo_dir / "blobs" / _blob_name(f)
        if not blob.exists():
            blob.write_bytes(f.read_bytes())
        os.symlink(os.path.relpath(blob, snap), snap / f.name)
    for ref in refs:
        (repo_dir / "refs" / ref).write_text(commit)
    return snap
