#!/usr/bin/env bash
# Fused-MoE config tuning for M3's expert shapes (E=128, N=3072/TP for TP 8,4,2,1; bf16 and block-FP8 fp8_w8a8
# [128,128] as the MXFP8 release runs on Hopper) on one H200, ~8 min (setup ~30 s + TUNE_BUDGET_S 420 s + the last M).
# Run from the repo root with OUT set:   bash scripts/gpu_tune_moe.sh [tune_moe.py args...]
# Writes $OUT/configs/triton_<ver>/<SGLang's name>.json per (dtype, TP) and $OUT/tune_moe.json (best vs SGLang's
# current config per M, with the gain; budget shares; not_reached). To ship: copy $OUT/configs/triton_<ver>/*.json
# into sglang_m3/moe_configs/configs/triton_<ver>/ (found by sglang_m3.moe_configs.lookup through plugin.py's hook).
set -uo pipefail
source scripts/gpu_setup.sh
timeout 560 python3 benchmarks/tune_moe.py --out "$OUT" --budget-s "${TUNE_BUDGET_S:-420}" "$@" 2>&1 \
  | tee "$OUT/tune_moe.log" | grep -E "^TP|^budget|wrote|Error" | tail -150
