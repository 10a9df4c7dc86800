"""scripts/gpu_consistency.py's verdict on ours' serving variants (fa3 dense layers, page size 128), from made-up
measurements: a variant passes when its prefill agrees with ours' within the bf16 bound and its gaps stay within
MARGIN of ours'; a variant that reads the wrong pages (prefill off) or decodes worse (a gap beyond the margin), or
that did not serve, fails the run."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))


def _server(prefill_shift: float, gap: float) -> dict:
    prefill = [[-1.0 - 0.1 * i - prefill_shift for i in range(8)] for _ in range(3)]
    return {"prefill_lp": prefill, "decode_vs_prefill": {"mean": gap, "max": 2 * gap}}


@pytest.mark.parametrize("variant", ["ours_fa3", "ours_page128"])
def test_variant_bars(variant):
    import gpu_consistency as gc

    ours = _server(0.0, 0.03)
    good = gc.verdict({"ours": ours, variant: _server(0.01, 0.03 + gc.MARGIN / 2)}, ["ours", variant])
    assert good["pass"], good
    assert any(k.startswith(f"{variant} prefill vs ours'") for k in good["checks"])

    wrong_pages = gc.verdict({"ours": _server(0.0, 0.03), variant: _server(2 * gc.MEAN_TOL, 0.03)})
    assert not wrong_pages["pass"]
    worse_decode = gc.verdict({"ours": _server(0.0, 0.03), variant: _server(0.0, 0.03 + 2 * gc.MARGIN)})
    assert not worse_decode["pass"]
    crashed = gc.verdict({"ours": _server(0.0, 0.03), variant: {"error": "boom"}}, ["ours", variant])
    assert not crashed["pass"] and variant in crashed["servers_failed"]
