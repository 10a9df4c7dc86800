#!/usr/bin/env bash
# The benchmarks of issues 4 and 9, for the device host. Run from the repo root with OUT set:
#   bash scripts/gpu_bench.sh kernel-tests [pytest args...]       # GPU kernel tests (both indexer variants), ~2-4 min
#   bash scripts/gpu_bench.sh kernels [kernel_decode.py args...]   # ours vs in-tree kernels + HBM floor
#   bash scripts/gpu_bench.sh knobs KNOB=v1,v2 ... -- [kernel_decode.py args...]   # ours only, per launch-knob setting
#   bash scripts/gpu_bench.sh e2e --servers ours                    # one server per call (10-minute limit)
#   bash scripts/gpu_bench.sh e2e --servers intree                  # the work dir in /tmp keeps the first call's numbers
# Raw JSON lands in $OUT (kernel_decode.json, e2e.json); keep the final same-run comparison under benchmarks/results/.
set -uo pipefail
source scripts/gpu_setup.sh
what=$1; shift
case "$what" in
  kernel-tests) timeout "${KERNEL_TEST_TIMEOUT:-420}" python3 -m pytest -v -m gpu -rs --durations=10 \
                  tests/test_kernels.py "$@" 2>&1 | tee "$OUT/kernel_tests.log" | grep -vE "^\s*$" | tail -60 ;;
  kernels) python3 benchmarks/kernel_decode.py --out "$OUT" "$@" 2>&1 | tee "$OUT/kernels.log" | tail -60 ;;
  knobs) python3 benchmarks/sweep_launch_knobs.py "$@" 2>&1 | tee "$OUT/knobs.log" | grep -E "^##|ours_us" | tail -80 ;;
  e2e) python3 benchmarks/e2e.py --out "$OUT" "$@" 2>&1 | tee "$OUT/e2e.log" | tail -40 ;;
  *) echo "usage: gpu_bench.sh kernel-tests|kernels|knobs|e2e [args]"; exit 2 ;;
esac
