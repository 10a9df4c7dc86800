#!/usr/bin/env bash
# Run several GPU checks in one device call and bring back everything in one archive (the device host returns
# at most 8 files). Each step is "NAME=COMMAND"; it runs with OUT=$OUT/work/NAME, its own timeout (seconds, from
# STEP_TIMEOUT, default 300) and its log in $OUT/work/NAME/log.txt. Steps run in order; a failing step does
# not stop the next. Prefix a step's command with "gpu1:" to run it in the background on the second GPU of a
# two-GPU host (the round waits for it before archiving).
#   bash scripts/gpu_round.sh "kernels=python3 -m pytest -m gpu tests/test_kernels.py" "gpu1:e2e=python3 ..."
set -uo pipefail
root=${OUT:?set OUT}
mkdir -p "$root/work"
source scripts/gpu_setup.sh >"$root/work/setup.log" 2>&1
export OUT=$root
cat "$root/device.txt" 2>/dev/null
pids=()
for step in "$@"; do
  name=${step%%=*}; cmd=${step#*=}; dev=0
  case "$name" in gpu1:*) name=${name#gpu1:}; dev=1 ;; esac
  dir="$root/work/$name"; mkdir -p "$dir"
  run() {
    local t0=$SECONDS
    ( export OUT="$dir" CUDA_VISIBLE_DEVICES=$dev; timeout "${STEP_TIMEOUT:-300}" bash -c "$cmd" ) >"$dir/log.txt" 2>&1
    rc=$?; echo "[$name] rc=$rc $((SECONDS - t0))s on gpu$dev" | tee -a "$root/work/summary.txt"
  }
  if [ "$dev" = 1 ]; then run & pids+=($!); else run; fi
done
for p in "${pids[@]}"; do wait "$p"; done
tar -czf "$root/round.tgz" -C "$root" work && rm -rf "$root/work"
ls -la "$root"
