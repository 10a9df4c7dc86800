#!/usr/bin/env bash
# The whole GPU verification, for the device host (no package index there). Run from the repo root with
# OUT set; the two wheel folders from ../shared/gpu/prepare.sh must have been installed first (each travels
# in its own call: `bash .gpu/install.sh .gpu/a`, then this script in the call that carries .gpu/b).
#   bash scripts/gpu_verify.sh [gpu_e2e.py args...]
set -uo pipefail
for d in .gpu/a .gpu/b; do [ -d "$d" ] && bash .gpu/install.sh "$d"; done
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . 2>&1 | grep -v "Target directory" | tail -2
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch, triton, sglang; print('torch', torch.__version__, 'triton', triton.__version__, 'sglang', sglang.__version__)"; } | tee "$OUT/device.txt"
if [ -z "${SKIP_KERNEL_TESTS:-}" ]; then
  # Bounded: the GPU tests compare against the torch twins, which are slow at 128K contexts.
  timeout "${KERNEL_TEST_TIMEOUT:-300}" python3 -m pytest -v -m gpu -rs --durations=10 tests/test_kernels.py ${KERNEL_TEST_ARGS:-} 2>&1 \
    | tee "$OUT/kernels.log" | grep -E "PASS|FAIL|ERROR|passed|failed|error" | tail -30
fi
python3 scripts/gpu_e2e.py --out "$OUT" "$@" 2>&1 | tee "$OUT/e2e.log" | tail -60
