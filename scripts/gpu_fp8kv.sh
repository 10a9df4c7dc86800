#!/usr/bin/env bash
# fp8 KV cache on the device host (issue 10, item 4). Run from the repo root with OUT set:
#   bash scripts/gpu_fp8kv.sh [gpu_fp8kv.py args...]
# 1. the kernel on fp8 K/V vs its torch twin at real shapes (pytest -m gpu tests/test_fp8_kv.py, ~1-2 min);
# 2. served fp8_e4m3 vs bf16 KV, teacher-forced, decode graphs on: verdict in $OUT/fp8kv.md (scripts/gpu_fp8kv.py).
set -uo pipefail
source scripts/gpu_setup.sh
timeout "${KERNEL_TEST_TIMEOUT:-240}" python3 -m pytest -v -s -m gpu -rs tests/test_fp8_kv.py 2>&1 \
  | tee "$OUT/fp8kv_kernels.log" | grep -E "PASS|FAIL|ERROR|passed|failed|error|fp8 vs bf16" | tail -20
python3 scripts/gpu_fp8kv.py --out "$OUT" "$@" 2>&1 | tee "$OUT/fp8kv_e2e.log" | tail -30
