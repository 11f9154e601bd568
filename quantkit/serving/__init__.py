"""Can a server load this checkpoint? ``check(view, server)`` answers from config.json and the tensor
headers alone, with the rules each server's loader applies today, each rule citing the upstream file it
was read from (nothing here runs the servers: vLLM and FastDeploy need GPUs and do not install here).

A ``CheckpointView`` is what a loader sees before it reads a byte of weights: the config dict and every
tensor's name, dtype and shape. It is built from a checkpoint directory (``CheckpointView.from_dir``) or
from a quantization plan before any work (``CheckpointView.from_specs``), so ``quantkit quantize --server S``
and ``quantkit check PATH --server S`` apply the very same rules.

Each server is a module with ``check(view, tp) -> list[Reason]`` (empty = it loads), ``VERSIONS`` (the
upstream revision its rules were read from) and ``SERVE`` (the command that serves a checkpoint ``{path}``): ``vllm``, ``fastdeploy``, ``transformers``, ``native``
(quantkit itself, named ``quantkit`` on the command line).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from quantkit.errors import UsageError

SERVERS = {"vllm": "vllm", "fastdeploy": "fastdeploy", "transformers": "transformers", "quantkit": "native"}


@dataclass(frozen=True)
class Reason:
    """One reason a server would refuse a checkpoint: what, where (a tensor, module or config key), the
    rule it breaks, and the upstream source of that rule (``repo path::function``)."""

    what: str
    where: str
    rule: str
    source: str

    def line(self) -> str:
        return f"{self.what} at {self.where}: {self.rule} [{self.source}]"


@dataclass(frozen=True)
class CheckpointView:
    """config.json as a dict, and ``{tensor name: (dtype, shape)}`` for every tensor of the checkpoint."""

    config: dict
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...]]]

    @classmethod
    def from_dir(cls, path: str | Path) -> "CheckpointView":
        from quantkit.model.safetensors_io import CheckpointReader

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise UsageError(f"{path}: no config.json")
        try:
            config = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise UsageError(f"{cfg_file}: not valid JSON ({e.msg})") from None
        reader = CheckpointReader(path)
        return cls(config, {n: (i.dtype, tuple(i.shape)) for n, i in reader.infos.items()})

    @classmethod
    def from_specs(cls, config: dict, specs) -> "CheckpointView":
        """From a planned output: its config.json and its ``TensorSpec`` list (``pipeline.quantize.output_specs``)."""
        return cls(config, {s.name: (s.dtype, tuple(s.shape)) for s in specs})

    @property
    def qconfig(self) -> dict | None:
        return self.config.get("quantization_config")


def server_module(server: str):
    if server not in SERVERS:
        raise UsageError(f"unknown server {server!r}: use one of {', '.join(SERVERS)}")
    return importlib.import_module(f"quantkit.serving.{SERVERS[server]}")


def check(view: CheckpointView, server: str, tp: int = 1) -> list[Reason]:
    """The reasons ``server`` (at tensor-parallel size ``tp``) would refuse ``view``; empty if it loads it."""
    if tp < 1:
        raise UsageError(f"--tp must be >= 1, got {tp}")
    return server_module(server).check(view, tp)


def check_all(view: CheckpointView, tp: int = 1) -> dict[str, list[Reason]]:
    """Every server's verdict on ``view``."""
    return {s: check(view, s, tp) for s in SERVERS}


def format_verdict(server: str, reasons: list[Reason], tp: int = 1, path: str = "PATH") -> list[str]:
    """One line when the server loads it (with the command that serves ``path``), else one line per reason."""
    on = f"{server}" + (f" (tp={tp})" if tp > 1 else "")
    if not reasons:
        mod = server_module(server)
        return [f"{on}: loads ({mod.VERSIONS}); serve: {mod.SERVE.format(path=path, tp=tp)}"]
    return [f"{on}: no: {r.line()}" for r in reasons]
