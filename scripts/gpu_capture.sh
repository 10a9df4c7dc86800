#!/usr/bin/env bash
# Decode-graph capture time (issue 9 §4, target <= 30 s cold for bs <= 64) on the device host, ~5 min on one H200 (warm start skipped if it would not fit).
# Run from the repo root with OUT set:   bash scripts/gpu_capture.sh
#  1. benchmarks/capture_variants.py: our MSA kernels' cold warm-up per captured batch size (TP1 and TP8 heads),
#     the kernels compiled, and whether they are the ones the CPU recorder (tests/test_capture_variants.py) predicts;
#  2. benchmarks/capture_time.py --warm: our server on the e2e model (4-layer real dims, e2e flags), cold then warm
#     Triton cache: start-up, capture seconds, and every Triton compile inside the capture window by kernel.
# Writes $OUT/capture_variants.json, $OUT/capture_time.{json,md}.
set -uo pipefail
source scripts/gpu_setup.sh
timeout 80 python3 benchmarks/capture_variants.py --out "$OUT" 2>&1 | tee "$OUT/capture_variants.log" \
  | grep -E "warmup_s_total|compiled_total|prediction_matches|Error" 
timeout 215 python3 benchmarks/capture_time.py --out "$OUT" --warm --budget-s 205 2>&1 | tail -40
