import os
from pathlib import Path

import pytest
import torch

# Triton decides at import time whether its @jit functions (its own tl.cdiv included) run in the CPU
# interpreter, and some test modules import packages that import triton (compressed-tensors), so the switch
# must be set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Never touch the network from tests; a fresh cache per CI run unless the caller set one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("QUANTKIT_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "quantkit"))


@pytest.fixture(scope="session")
def tiny_dir():
    from quantkit.sources import resolve

    return resolve("random:ernie-tiny")
