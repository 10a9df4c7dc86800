"""The fused clamped SwiGLU kernel (sglang_m3/layers/swiglu_triton.py) against its torch twin (swiglu.swigluoai,
itself checked against a float64 oracle in test_layers.py).

Under TRITON_INTERPRET=1 (a subprocess: the variable must be set before triton is imported) and on the GPU: fp32
within 1e-6 · (|value| + 1) (sigmoid and products in another order), bf16 within one bf16 ulp of the twin
(2^-7 · |value| + 1e-6: fp32 results a hair apart may round to neighbouring bf16 values). Inputs span the clamp
(|x| up to 12 against the limit 7), the intermediate width is not a multiple of the kernel's column tile, and the
input is a view with a row stride wider than 2I (as a slice of a larger projection).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__" and "--worker" in sys.argv:  # before anything can import triton
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sglang_m3.layers.swiglu import swigluoai  # noqa: E402

ALPHA, LIMIT = 1.702, 7.0  # the release's swiglu_alpha, swiglu_limit (M3_SPEC §1.1)


def make_case(T: int, inter: int, dtype, device="cpu", seed: int = 0) -> torch.Tensor:
    """A [T, 2I] view into a wider buffer (row stride 2I + 5), values in [-12, 12]."""
    g = torch.Generator().manual_seed(seed)
    wide = (torch.rand(T, 2 * inter + 5, generator=g) * 24 - 12).to(dtype).to(device)
    return wide[:, 3:3 + 2 * inter]


def within(got: torch.Tensor, want: torch.Tensor) -> bool:
    err = (got.double() - want.double()).abs()
    if want.dtype == torch.bfloat16:
        bound = 2.0 ** -7 * want.double().abs() + 1e-6
    else:
        bound = 1e-6 * (want.double().abs() + 1)
    return bool((err <= bound).all())


def _worker() -> None:
    from sglang_m3.layers.swiglu_triton import BLOCK, swigluoai_triton

    results = {}
    for T, inter in ((3, 40), (2, BLOCK + 7)):
        for dtype in (torch.float32, torch.bfloat16):
            x = make_case(T, inter, dtype, seed=inter)
            got, want = swigluoai_triton(x, ALPHA, LIMIT), swigluoai(x, ALPHA, LIMIT)
            results[f"{T}x{inter}_{str(dtype)[6:]}"] = {
                "ok": within(got, want) and got.shape == want.shape and got.dtype == want.dtype,
                "max_err": float((got.double() - want.double()).abs().max())}
    results["empty"] = {"ok": swigluoai_triton(torch.zeros(0, 8), ALPHA, LIMIT).shape == (0, 4)}
    try:
        swigluoai_triton(torch.zeros(2, 7), ALPHA, LIMIT)
        results["odd_refused"] = {"ok": False}
    except ValueError as e:
        results["odd_refused"] = {"ok": "[T, 2I]" in str(e)}
    print("@@RESULT@@" + json.dumps(results), flush=True)


def test_triton_kernel_interpreted():
    from tests.conftest import interpreted_worker  # not at module level: the worker runs this file as a script

    results = interpreted_worker(__file__, "--worker", timeout=600)
    assert len(results) == 6, results
    for name, r in results.items():
        assert r["ok"], (name, r)


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1", reason="needs CUDA")
@pytest.mark.parametrize("inter", [3072, 12288, 384])
def test_kernel_on_gpu(inter):
    """At the shared expert's / dense MLP's per-rank widths (TP1 and TP8), bf16, 300 tokens: within one bf16 ulp of
    the twin on the same GPU data."""
    from sglang_m3.layers.swiglu_triton import swigluoai_triton

    x = make_case(300, inter, torch.bfloat16, device="cuda", seed=inter)
    assert within(swigluoai_triton(x, ALPHA, LIMIT), swigluoai(x, ALPHA, LIMIT))
