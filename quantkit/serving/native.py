"""quantkit itself as the server: what ``quantkit.load`` reads. The check runs the loader's own steps on the
meta device over the tensor headers (config parsing, the quantized-module swap driven by
``quantization_config``, the name check, and each tensor's dtype and shape against its parameter), so it
cannot drift from the loader: it *is* the loader, minus reading the bytes.
"""

from __future__ import annotations

from types import SimpleNamespace

from quantkit.errors import QuantkitError
from quantkit.serving import CheckpointView, Reason

VERSIONS = "this quantkit"
SERVE = "quantkit generate {path} --prompt 'The state of the union' --device cuda  (Python: quantkit.load('{path}'))"
SOURCE = "quantkit/model/loader.py::Checkpoint"


class _HeaderReader:
    """The part of ``CheckpointReader`` the skeleton builder uses, over a ``CheckpointView``."""

    def __init__(self, view: CheckpointView):
        self.infos = {n: SimpleNamespace(dtype=d, shape=s) for n, (d, s) in view.tensors.items()}

    def names(self) -> list[str]:
        return list(self.infos)

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def info(self, name: str):
        try:
            return self.infos[name]
        except KeyError:
            raise QuantkitError(f"tensor {name} not found") from None


def check(view: CheckpointView, tp: int = 1) -> list[Reason]:
    from quantkit.model.config import MoeConfig
    from quantkit.model.loader import build_skeleton, check_names, expected_tensors

    if tp != 1:
        return [Reason("tensor parallelism", "--tp", "quantkit.load runs a model on one device", SOURCE)]
    reader = _HeaderReader(view)
    try:
        cfg = MoeConfig.from_dict(view.config)
        skeleton = build_skeleton(cfg, view.qconfig, reader, "checkpoint")
        check_names(skeleton, cfg, reader.names(), "checkpoint")
    except QuantkitError as e:
        return [Reason("the loader refuses it", "config.json / tensors", str(e), SOURCE)]
    reasons = []
    for name, (dtype, shape) in expected_tensors(skeleton, cfg).items():
        got_dtype, got_shape = view.tensors[name]
        if name.endswith("e_score_correction_bias"):
            shape, got_shape = (int(_numel(shape)),), (int(_numel(got_shape)),)  # [1, E] or [E]
        if got_shape != shape or (not dtype.is_floating_point and got_dtype != dtype):
            reasons.append(Reason("tensor shape/dtype", name, f"stored {got_dtype} {list(got_shape)}, the model "
                                  f"needs {dtype} {list(shape)}", SOURCE + ".materialize"))
    return reasons


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
