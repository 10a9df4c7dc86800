#!/usr/bin/env bash
# Run the test suite (CPU: everything but the `gpu`-marked tests, which skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec python -m pytest -q -rs "$@" tests
