"""scripts/env.sh is sourced by every entry point (examples/serve_tiny.sh, scripts/test.sh, .ci/run): it must leave
the caller's shell options as it found them. A newcomer found that its closing `set +e` switched off the `set -e`
of examples/serve_tiny.sh, which then went on after a failed step. Oracle: bash's own `$-` after sourcing it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("errexit", [True, False])
def test_sourcing_env_keeps_the_callers_errexit(errexit):
    script = f"{'set -e; ' if errexit else ''}source {REPO}/scripts/env.sh >/dev/null 2>&1; echo \"flags=$-\"; " \
             "false; echo after-false"
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600).stdout
    flags = out.split("flags=")[1].split()[0]
    assert ("e" in flags) == errexit, out
    assert ("after-false" in out) != errexit, out  # set -e still stops the caller at the failing step
