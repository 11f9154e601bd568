#!/usr/bin/env bash
# On a machine with PyPI (not the GPU machine, which reaches nothing): fetch the benchmark anchors' wheels into
# .whl/ for the GPU machine's Python 3.12, so that `scripts/gpu_kernels.sh` can install them there from the
# carried folder. torchao ships a binary wheel (its int4 path calls torch's own _weight_int4pack_mm);
# gemlite is pure Python (Triton kernels) and is published as an sdist only, so it is built into a wheel here.
#   bash scripts/gpu_wheels.sh [TORCHAO_VERSION] [GEMLITE_VERSION]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCHAO=${1:-0.17.0}
GEMLITE=${2:-0.6.0.post2}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  -d .whl "torchao==$TORCHAO"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "gemlite==$GEMLITE" 2>/dev/null \
  || "$PY" -m pip wheel -q --no-deps -w .whl "gemlite==$GEMLITE"
ls -l .whl
