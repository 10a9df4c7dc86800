#!/usr/bin/env bash
# Bring sgl_kernel's FA3 module (flash_ops.abi3.so) to a GPU host whose SGLang came from ../shared/gpu. That set
# drops the module (1.1 GB uncompressed: more than one device transfer of 64 MiB), so neither server can start with
# --attention-backend fa3 there, and the in-tree M3 cannot start with no backend named (it picks fa3 on Hopper).
#   here:      bash scripts/gpu_fa3.sh pack        # the venv's module -> .gpu/fa3/part.aa, .ab, ... (< 56 MB each; ~10 min)
#   the host:  bash scripts/gpu_fa3.sh add         # one call per part, carry [".gpu/fa3/part.XX", ".gpu/fa3/SHA256"]
#              bash scripts/gpu_fa3.sh install     # after the last part and .gpu/b: unpacks into /tmp/site, imports it
# The parts must arrive in order (add refuses one out of order). Unpacking needs the zstandard module of .gpu/b.
set -euo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || pwd)"
acc=/tmp/fa3.zst
case "${1:-}" in
  pack)  # from the venv's files (importing sgl_kernel here finds cpu_shim's stand-in, or fails without libcuda)
    venv=${SGLANG_M3_VENV:-$HOME/.cache/sglang-m3/venv}
    so=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/sgl_kernel/flash_ops.abi3.so
    [ -f "$so" ] || { echo "no $so (the venv of scripts/env.sh, sglang-kernel installed)"; exit 1; }
    rm -rf .gpu/fa3 && mkdir -p .gpu/fa3
    zstd -q --ultra -19 --long=27 -T0 -c "$so" | split -b 55M - .gpu/fa3/part.
    (cd .gpu/fa3 && cat part.* | sha256sum | cut -d' ' -f1 > SHA256 && ls -la)
    ;;
  add)  # appends every part present from the next one expected on (a warm host may keep earlier calls' parts)
    [ -f .gpu/fa3/SHA256 ] && cp .gpu/fa3/SHA256 /tmp/fa3.sha256
    want=$(cat /tmp/fa3.next 2>/dev/null || echo aa)
    [ -f .gpu/fa3/part.$want ] || { echo "part $want is not in this call's tree (carry .gpu/fa3/part.$want)"; exit 1; }
    while [ -f .gpu/fa3/part.$want ]; do
      cat .gpu/fa3/part.$want >> $acc; rm -f .gpu/fa3/part.$want; echo "added part $want"
      want=$(python3 -c "import sys; n=(ord(sys.argv[1][0])-97)*26+ord(sys.argv[1][1])-96; print(chr(97+n//26)+chr(97+n%26))" $want)
      echo $want > /tmp/fa3.next
    done
    echo "$(stat -c %s $acc) bytes so far"
    ;;
  install)  # a truncated zstd stream decompresses without an error: the SHA-256 is the only completeness check
    [ -f /tmp/fa3.sha256 ] || { echo "no SHA-256 on this host: carry .gpu/fa3/SHA256 with part.aa"; exit 1; }
    [ "$(sha256sum $acc | cut -d' ' -f1)" = "$(cat /tmp/fa3.sha256)" ] \
      || { echo "$acc does not match .gpu/fa3/SHA256: a part is missing or repeated"; exit 1; }
    dst=/tmp/site/sgl_kernel/flash_ops.abi3.so
    PYTHONPATH=/tmp/site python3 -c "
import zstandard
with open('$acc', 'rb') as fi, open('$dst.tmp', 'wb') as fo:
    zstandard.ZstdDecompressor(max_window_size=2**31).copy_stream(fi, fo)
"
    mv "$dst.tmp" "$dst" && rm -f $acc /tmp/fa3.next  # a later transfer starts again at part.aa
    PYTHONPATH=/tmp/site python3 -c "import sgl_kernel.flash_attn as f; print('FA3 importable:', f.is_fa3_supported())"
    ;;
  *) echo "usage: $0 pack|add|install"; exit 2 ;;
esac
