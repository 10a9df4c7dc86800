"""The end-to-end benchmark harness (benchmarks/e2e.py) runs: its CPU smoke mode serves the tiny model and
drives SGLang's serving benchmark through it. Numbers are not judged here (speed is recorded in BENCHMARKS.md,
not tested); what is checked is that every request ran with exactly the lengths the workload asks for."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, cpu_env

pytestmark = pytest.mark.server


def test_e2e_benchmark_smoke(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "e2e.py"), "--smoke", "--servers", "ours",
           "--out", str(tmp_path), "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, env=cpu_env(), cwd=REPO, text=True, timeout=900,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout[-4000:]
    sys.path.insert(0, str(REPO / "benchmarks"))
    from e2e import SMOKE_WORKLOADS, WAVES

    results = json.loads((tmp_path / "e2e.json").read_text())
    ours = results["servers"]["ours"]
    assert "error" not in ours, ours
    for name, (inp, outp, conc) in SMOKE_WORKLOADS.items():
        m = ours["workloads"][name]
        n = WAVES * conc
        assert (m["completed"], m["total_input_tokens"], m["total_output_tokens"]) == (n, n * inp, n * outp), m
        assert m["output_throughput"] > 0 and m["median_ttft_ms"] > 0
    assert "| smoke (300/8, 2) |" in (tmp_path / "e2e.md").read_text()
