# Sourced by the GPU scripts on the device host (no package index there): installs the wheel folders from
# ../shared/gpu/prepare.sh that travelled with this call (`.gpu/a`, `.gpu/b`; each is too big to carry with
# the other, so the first call installs `.gpu/a` alone with `bash .gpu/install.sh .gpu/a`), then this package,
# and records the device. `.gpu/c` holds what ../shared/gpu's trimmed set lacks but sglang 0.5.17 declares and
# EAGLE's draft-graph capture imports (sgl-deep-gemm; carry it with `.gpu/a`), made here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .gpu/c sgl-deep-gemm==0.1.5.post1
for d in .gpu/a .gpu/b .gpu/c; do [ -d "$d" ] && bash .gpu/install.sh "$d"; done
export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --upgrade --target /tmp/site . 2>&1 | grep -v "Target directory" | tail -2
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch, triton, sglang; print('torch', torch.__version__, 'triton', triton.__version__, 'sglang', sglang.__version__)"; } | tee "$OUT/device.txt"
