"""Resumable runs: after each layer the partial output directory records what is done.

State, inside the hidden partial directory beside OUT (written atomically: temp file + rename):
    .resume.json        fingerprint, last finished layer, tensors written, report rows so far, and
                        which generation of the calibration hidden states (``hidden/``) is the next
                        layer's input (calibrated methods only; see ``quantkit.calib.hidden``)
The fingerprint covers the source (config.json and the safetensors headers), the recipe, the
calibration options, the device and quantkit's version: ``--resume`` refuses any mismatch, so the
continued run computes exactly what an uninterrupted one would (byte-identical shards).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from quantkit import __version__
from quantkit.errors import UsageError

STATE_FILE = ".resume.json"
HIDDEN_DIR = "hidden"
FP_HIDDEN_DIR = "hidden_fp"  # the fp stream of GPTQ rules with fp_target


def fingerprint(src: Path, reader, parts: dict) -> str:
    h = hashlib.sha256()
    h.update((src / "config.json").read_bytes())
    for name in sorted(reader.infos):
        i = reader.infos[name]
        h.update(f"{name}|{i.dtype}|{i.shape}|{i.nbytes}|{i.file.stat().st_size}".encode())
    h.update(json.dumps({**parts, "quantkit": __version__}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_state(partial: Path, state: dict) -> None:
    _atomic(partial / STATE_FILE, lambda p: p.write_text(json.dumps(state)))


def load_state(partial: Path, fp: str) -> dict | None:
    """The saved state of an interrupted run with this fingerprint; None if there is none."""
    f = partial / STATE_FILE
    if not f.is_file():
        return None
    state = json.loads(f.read_text())
    if state.get("fingerprint") != fp:
        raise UsageError(f"{partial} holds an interrupted run with a different source, recipe, data, seed or device; "
                         "run without --resume to start over")
    return state


def clear_state(partial: Path) -> None:
    (partial / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(partial / HIDDEN_DIR, ignore_errors=True)
    shutil.rmtree(partial / FP_HIDDEN_DIR, ignore_errors=True)
