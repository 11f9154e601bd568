import os
from pathlib import Path

import pytest

# Never touch the network from tests; a fresh cache per CI run unless the caller set one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("QUANTKIT_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "quantkit"))


@pytest.fixture(scope="session")
def tiny_dir():
    from quantkit.sources import resolve

    return resolve("random:ernie-tiny")
