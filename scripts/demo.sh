#!/usr/bin/env bash
# README command 1: set everything up, build the real-weights demo MoE (once, cached), quantize it,
# and print its perplexity before and after. Override with RECIPE=w2g64, METHOD=gptq, WINDOWS=40, DATA=...
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
QK=.venv/bin/quantkit
RECIPE=${RECIPE:-w4g128}
METHOD=${METHOD:-rtn}
DATA=${DATA:-sotu:test}
OUT=${OUT:-out/demo-$RECIPE-$METHOD}
ARGS=(--data "$DATA" --seq-len 512 --max-windows "${WINDOWS:-16}")
echo "== before: demo:smollm2-moe (real-weights ERNIE-4.5-MoE built from SmolLM2-135M) =="
$QK eval perplexity demo:smollm2-moe "${ARGS[@]}"
echo "== quantize: $RECIPE ($METHOD) =="
$QK quantize demo:smollm2-moe -o "$OUT" --recipe "$RECIPE" --method "$METHOD" --force \
    --calib sotu:train --calib-samples 32 --calib-seq-len 512
echo "== after: $OUT =="
$QK eval perplexity "$OUT" "${ARGS[@]}"
