#!/usr/bin/env bash
# On a CUDA machine: the kernel tests (small shapes compiled, plus the full-shape `gpu` ones), then the kernel and
# decode benchmarks. Results go to benchmarks/results/ (named by device and date) and, when $OUT is set, to $OUT.
#   bash scripts/gpu_kernels.sh [tests|kernels|decode|tune|all]   (default all = tests, kernels, decode; each part
#   fits in a few minutes; tune sweeps tile configs for retuning the defaults)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The benchmark anchors (torchao, gemlite), where scripts/gpu_wheels.sh fetched them and .whl/ was carried here.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/anchors .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/anchors"
fi
LOG=${OUT:-benchmarks/results}
mkdir -p "$LOG"
part=${1:-all}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv || true
if [[ $part == tests || $part == all ]]; then
  "$PY" -m pytest tests/test_kernels_dense.py tests/test_kernels_moe.py tests/test_kernels_code2.py -q -p no:cacheprovider \
    2>&1 | tee "$LOG/gpu_kernel_tests.txt"
fi
if [[ $part == kernels || $part == all ]]; then
  "$PY" benchmarks/kernels.py --anchors 2>&1 | tee "$LOG/kernels_table.txt"
fi
if [[ $part == decode || $part == all ]]; then
  "$PY" benchmarks/decode.py 2>&1 | tee "$LOG/decode_table.txt"
fi
if [[ $part == tune ]]; then
  "$PY" benchmarks/tune.py 2>&1 | tee "$LOG/tune_table.txt"
fi
if [[ -n ${OUT:-} ]]; then
  cp benchmarks/results/kernels_*.json benchmarks/results/decode_*.json benchmarks/results/tune_*.json "$OUT"/ 2>/dev/null || true
fi
