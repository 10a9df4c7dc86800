#!/usr/bin/env bash
# Speculative decoding on one GPU (issue 11), for the device host. Run from the repo root with OUT set:
#   bash scripts/gpu_spec.sh [gpu_spec.py args, e.g. --servers base,eagle3 --budget-s 330]
# EAGLE3 (random tiny draft, chain and tree) and NGRAM vs no speculation, graphs on and off, radix hits, accept
# length and decode tok/s at concurrency 1 and 8, the in-tree M3 with the same flags as yardstick. Servers past
# the time budget are recorded as skipped (run them in a second call with --servers). Verdict and table:
# $OUT/spec_results.md; everything: $OUT/spec_results.json; each server's whole log: $OUT/logs/server_<name>.log.
set -uo pipefail
# inside gpu_round.sh (which sets SGLANG_M3_PORT_LANE per step) the round already installed everything; a second
# pip install into /tmp/site while the other lane's servers import from it would race
[ -n "${SGLANG_M3_PORT_LANE:-}" ] || source scripts/gpu_setup.sh
# python in the background so a SIGTERM to this script (a step timeout) reaches it: it then stops its server.
python3 scripts/gpu_spec.py --out "$OUT" "$@" >"$OUT/spec.log" 2>&1 &
py=$!
trap 'kill -TERM $py 2>/dev/null; wait $py' TERM INT
wait $py
rc=$?
tail -40 "$OUT/spec.log"
exit $rc
