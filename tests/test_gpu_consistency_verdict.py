"""scripts/gpu_consistency.py's verdict, on made-up measurements. Ours' serving variants (fa3 dense layers, page size
128) pass when their prefill agrees with ours' within the bf16 bound and their gaps stay within MARGIN of ours'; a
variant that reads the wrong pages (prefill off), decodes worse (a gap beyond the margin) or did not serve fails the
run. A quantized server's bar is ours' gap plus half its measured quantization effect."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))


def _server(prefill_shift: float, gap: float) -> dict:
    prefill = [[-1.0 - 0.1 * i - prefill_shift for i in range(8)] for _ in range(3)]
    return {"prefill_lp": prefill, "decode_vs_prefill": {"mean": gap, "max": 2 * gap}}


@pytest.mark.parametrize("variant", ["ours_fa3", "ours_page128", "ours_fa3_page128"])
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


def test_quantized_bar_is_ours_gap_plus_half_the_quantization_effect():
    import gpu_consistency as gc

    ours, shift = _server(0.0, 0.03), 0.4  # Δq = 0.4 (prefill vs ours' prefill at every position)
    fp8 = _server(shift, 0.03 + 0.9 * gc.QUANT_BAR_FRACTION * shift)
    inside = gc.verdict({"ours": ours, "ours_fp8": fp8})
    assert inside["pass"], inside
    assert fp8["quant_effect"]["mean"] == pytest.approx(shift)
    assert fp8["quant_bar"]["decode_vs_prefill"] == pytest.approx(0.03 + gc.QUANT_BAR_FRACTION * shift, abs=1e-4)
    outside = gc.verdict({"ours": ours, "ours_fp8": _server(shift, 0.03 + 1.1 * gc.QUANT_BAR_FRACTION * shift)})
    assert not outside["pass"]
