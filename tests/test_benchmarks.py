"""benchmarks/kernel_decode.py --smoke: the issue-4 benchmark's CPU cross-check.

The smoke run executes our MSA kernels and SGLang 0.5.17's in-tree MiniMax-M3 kernels (through the benchmark's
adapter, i.e. the same calls the timed GPU run makes) under the Triton interpreter on identical tiny inputs,
plus our torch reference, and records the differences in its JSON. Checked here: every decode/prefill case
selects exactly the same blocks on both sides (and as the reference), and the attention outputs agree within
ATOL. The data are fp16 (see the benchmark's docstring); the observed differences are one fp16 ulp (<= 1e-3:
outputs of magnitude <~ 2, and the in-tree rounds its split-K partials to fp16 before merging them).
Runs in a subprocess because TRITON_INTERPRET must be set before triton is imported (~2.5 min on one core).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ATOL = 5e-3


def test_kernel_decode_smoke_matches_intree_kernels(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "kernel_decode.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True,
                          text=True, timeout=600)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    res = json.loads((tmp_path / "kernel_decode_smoke.json").read_text())
    assert (tmp_path / "kernel_decode_smoke.md").exists()
    smoke = res["smoke_result"]
    cases = smoke["cases"]
    # 2 head layouts x (2 batch sizes x 2 contexts decode + 1 packed prefill)
    assert [c["kind"] for c in cases].count("decode") == 8 and [c["kind"] for c in cases].count("prefill") == 2
    for c in cases:
        where = f"{c['kind']} {c['heads']} seq_lens={c['seq_lens']}"
        assert c["sel_mismatch_ours_vs_intree"] == 0, where
        assert c["sel_mismatch_ours_vs_ref"] == 0, where
        assert c["sel_mismatch_intree_vs_ref"] == 0, where
        assert c["max_abs_ours_vs_intree"] <= ATOL, (where, c["max_abs_ours_vs_intree"])
        assert c["max_abs_ours_vs_ref"] <= ATOL, (where, c["max_abs_ours_vs_ref"])
        assert c["max_abs_intree_vs_ref"] <= ATOL, (where, c["max_abs_intree_vs_ref"])
    assert smoke["ok"], log
