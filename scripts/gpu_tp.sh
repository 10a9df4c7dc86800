#!/usr/bin/env bash
# Tensor parallelism on the device host (issue 12). Run from the repo root with OUT set:
#   bash scripts/gpu_tp.sh 2     # 2-GPU host: --tp 2 vs --tp 1, ~3-4 min
#   bash scripts/gpu_tp.sh 8     # 8-GPU host: --tp 8 vs --tp 1
#   bash scripts/gpu_tp.sh 2 --quant mxfp8   # the MXFP8 checkpoint at --tp 2 vs --tp 1 (+ a bf16 tp1 for dq), ~4-5 min
# Verdict (PASS/FAIL at gpu_e2e.py's bf16 bound) in $OUT/results.md; exit status 0 only on PASS.
set -uo pipefail
tp=${1:?usage: gpu_tp.sh TP [gpu_tp.py args...]}; shift
source scripts/gpu_setup.sh
# NVLink multicast stays off on the lent hosts (KINDS.md): keep these set for every server this starts.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
n=$(nvidia-smi -L | wc -l)
[ "$n" -ge "$tp" ] || { echo "--tp $tp needs $tp GPUs, this host has $n" | tee "$OUT/results.md"; exit 2; }
timeout "${TP_TIMEOUT:-540}" python3 scripts/gpu_tp.py --tp "$tp" --out "$OUT" "$@" 2>&1 | tee "$OUT/tp.log" | tail -40
exit "${PIPESTATUS[0]}"
