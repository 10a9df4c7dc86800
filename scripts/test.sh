#!/usr/bin/env bash
# Run the test suite (CPU: everything but the `gpu`-marked tests, which skip without CUDA; ~37 min on 2 cores).
# Arguments go to pytest: a file or test id runs just that (`bash scripts/test.sh tests/test_plugin.py`), options
# alone keep the whole suite (pyproject's testpaths), e.g. `-m "not server"` skips the tests that start a server.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec python -m pytest -q -rs "$@"
