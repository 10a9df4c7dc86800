#!/usr/bin/env bash
# Issue 10 (weights) on the device host, one H200 (~5-6 min; bounded at ~9.5 min with the setup). Run from the repo root with OUT set:
#   bash scripts/gpu_quant.sh [gpu_quant.py args...]
# GPU unit test of the block-FP8 GEMM on converted MXFP8 weights, then the served comparison: tiny MXFP8 and
# --quantization fp8 vs bf16 from the same weights, with a tolerance derived from the measured quantization error
# (scripts/gpu_quant.py says how). Verdict and numbers in $OUT/results.md; memory per server there too.
set -uo pipefail
source scripts/gpu_setup.sh
timeout 90 python3 -m pytest -q -m gpu -rs tests/test_quant.py 2>&1 | tee "$OUT/unit.log" | tail -5
timeout 450 python3 scripts/gpu_quant.py --out "$OUT" "$@" 2>&1 | tee "$OUT/quant.log" | tail -45
