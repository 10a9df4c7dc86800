#!/usr/bin/env bash
# Fused-MoE config tuning for M3's expert shapes (E=128, N=3072/TP for TP 1,2,4,8, bf16) on the device host, ~8 min.
# Run from the repo root with OUT set:   bash scripts/gpu_tune_moe.sh [tune_moe.py args...]
# Writes $OUT/configs/triton_<ver>/E=128,N=<N>,device_name=<GPU>.json (SGLang's format) and $OUT/tune_moe.json
# (best vs SGLang's current config per M, with the gain). To ship: copy $OUT/configs/triton_<ver>/*.json into
# sglang_m3/moe_configs/configs/triton_<ver>/ (found by sglang_m3.moe_configs.lookup once plugin.py hooks it in).
set -uo pipefail
source scripts/gpu_setup.sh
timeout 560 python3 benchmarks/tune_moe.py --out "$OUT" --budget-s "${TUNE_BUDGET_S:-420}" "$@" 2>&1 \
  | tee "$OUT/tune_moe.log" | grep -E "^TP|wrote|Error" | tail -70
