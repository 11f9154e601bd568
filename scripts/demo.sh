#!/usr/bin/env bash
# README command 1: set everything up, build the real-weights demo MoE (once, cached) and print perplexities.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
QK=.venv/bin/quantkit
DATA=${DATA:-sotu}
ARGS=(--data "$DATA" --seq-len 512 --max-windows 40)
echo "== dense SmolLM2-135M (as an ERNIE model), the reference =="
$QK eval perplexity demo:smollm2-dense "${ARGS[@]}"
echo "== demo:smollm2-moe (real-weights ERNIE-4.5-MoE built from it) =="
$QK eval perplexity demo:smollm2-moe "${ARGS[@]}"
