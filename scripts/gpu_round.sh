#!/usr/bin/env bash
# Run several GPU checks in one device call and bring back everything in one archive (the device host returns
# at most 8 files). Each step is "NAME=COMMAND"; it runs with OUT=$OUT/work/NAME, its own timeout (seconds, from
# STEP_TIMEOUT, default 300; "NAME@SECONDS=COMMAND" sets it per step) and its log in $OUT/work/NAME/log.txt. Steps
# run in order and a failing step does not stop the next. Steps named "gpu1:NAME" run, in their own order, on the
# second GPU of a two-GPU host alongside the others; the round waits for them before archiving.
# The device tool kills a call past its own limit without unwinding it, and a server (its own session) may survive
# that on a warm host: keep the step limits' sum ~20 s under the call's limit, and every round first stops servers
# left by an earlier call (they hold the GPU's memory and the ports of the next servers).
#   bash scripts/gpu_round.sh "kernels@300=python3 -m pytest -m gpu tests/test_kernels.py" "gpu1:spec=bash scripts/gpu_spec.sh"
set -uo pipefail
root=${OUT:?set OUT}
mkdir -p "$root/work"
source scripts/gpu_setup.sh >"$root/work/setup.log" 2>&1
if pkill -9 -f "^[^ ]*python[^ ]* -m sglang.launch_server" 2>/dev/null; then echo "stopped servers left by an earlier call"; sleep 5; fi
export OUT=$root
cat "$root/device.txt" 2>/dev/null

run_step() {  # run_step DEVICE "NAME[@SECONDS]=COMMAND"
  local dev=$1 step=$2 name cmd limit t0=$SECONDS rc
  name=${step%%=*}; cmd=${step#*=}; limit=${STEP_TIMEOUT:-300}
  case "$name" in *@*) limit=${name#*@}; name=${name%@*} ;; esac
  local dir="$root/work/$name"; mkdir -p "$dir"
  ( export OUT="$dir" CUDA_VISIBLE_DEVICES=$dev SGLANG_M3_PORT_LANE=$dev; timeout "$limit" bash -c "$cmd" ) >"$dir/log.txt" 2>&1
  rc=$?; echo "[$name] rc=$rc $((SECONDS - t0))s on gpu$dev" | tee -a "$root/work/summary.txt"
}

gpu0=(); gpu1=()
for step in "$@"; do
  case "$step" in gpu1:*) gpu1+=("${step#gpu1:}") ;; *) gpu0+=("$step") ;; esac
done
( for s in "${gpu1[@]}"; do run_step 1 "$s"; done ) &
for s in "${gpu0[@]}"; do run_step 0 "$s"; done
wait
nvidia-smi --query-gpu=index,memory.used --format=csv >>"$root/work/summary.txt" 2>&1
tar -czf "$root/round.tgz" -C "$root" work && rm -rf "$root/work"
ls -la "$root"
