#!/usr/bin/env bash
# README command 1: set everything up, build the real-weights demo MoE (once, cached), quantize it with the
# recommended 4-bit and 2-bit recipes (README, Recommended settings), print one table (perplexity, vs source, size, bits/weight),
# then which servers load each result and the command that serves it.
# Override with WINDOWS=16 (held-out eval windows of 512 tokens), CALIB_SAMPLES=32, DATA=sotu:test, OUT=out/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
QK=.venv/bin/quantkit
SRC=demo:smollm2-moe
DATA=${DATA:-sotu:test}
OUT=${OUT:-out/demo}
EVAL=(--data "$DATA" --seq-len 512 --max-windows "${WINDOWS:-16}")
CALIB=(--calib sotu:train --calib-samples "${CALIB_SAMPLES:-32}" --calib-seq-len 512)
mkdir -p "$OUT"
echo "== the source: $SRC (a real-weights ERNIE-4.5-MoE built from SmolLM2-135M) =="
$QK eval perplexity "$SRC" "${EVAL[@]}" --json "$OUT/source.json"
echo "== 4-bit, the recommended recipe: w4g128 with GPTQ (act order, weighted clipping; vLLM loads it) =="
$QK quantize "$SRC" -o "$OUT/w4g128-gptq" --recipe w4g128 --method gptq "${CALIB[@]}" --server vllm --force
$QK eval perplexity "$OUT/w4g128-gptq" "${EVAL[@]}" --json "$OUT/w4g128-gptq.json"
echo "== 2-bit, the recommended recipe: routed experts in the trellis code (L = 8 on a CPU; LDLQ encoder), the rest w4g128 GPTQ =="
$QK quantize "$SRC" -o "$OUT/w2trellis-gptq" --recipe benchmarks/recipes/w2trellis-L8.json --method gptq "${CALIB[@]}" --force
$QK eval perplexity "$OUT/w2trellis-gptq" "${EVAL[@]}" --json "$OUT/w2trellis-gptq.json"
echo
.venv/bin/python scripts/demo_table.py "$OUT" source w4g128-gptq w2trellis-gptq
for m in w4g128-gptq w2trellis-gptq; do
    echo
    echo "== who loads $OUT/$m (quantkit check) =="
    $QK check "$OUT/$m" || true
done
