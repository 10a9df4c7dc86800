#!/usr/bin/env bash
# The benchmarks of issue 4, for the device host. Run from the repo root with OUT set:
#   bash scripts/gpu_bench.sh kernels [kernel_decode.py args...]   # ours vs in-tree kernels + HBM floor
#   bash scripts/gpu_bench.sh e2e --servers ours                    # one server per call (10-minute limit)
#   bash scripts/gpu_bench.sh e2e --servers intree                  # the work dir in /tmp keeps the first call's numbers
set -uo pipefail
source scripts/gpu_setup.sh
what=$1; shift
case "$what" in
  kernels) python3 benchmarks/kernel_decode.py --out "$OUT" "$@" 2>&1 | tee "$OUT/kernels.log" | tail -60 ;;
  e2e) python3 benchmarks/e2e.py --out "$OUT" "$@" 2>&1 | tee "$OUT/e2e.log" | tail -40 ;;
  *) echo "usage: gpu_bench.sh kernels|e2e [args]"; exit 2 ;;
esac
