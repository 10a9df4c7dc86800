"""scripts/gpu_e2e.py's judgement of a server's self-consistency (decode vs prefill, radix hit vs flushed): the mean
|Δ logprob| alone is dominated by a few near-tie flips, so the verdict also bounds the rounding noise (mean without
flips) and the flip rate. Synthetic per-position deltas with known noise and flips stand in for a GPU run."""

from __future__ import annotations

import random
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_e2e  # noqa: E402


def _deltas(n: int, noise: float, flips: int, seed: int = 0) -> list[float]:
    rnd = random.Random(seed)
    d = [abs(rnd.gauss(0.0, noise)) for _ in range(n - flips)] + [rnd.uniform(1.0, 5.0) for _ in range(flips)]
    rnd.shuffle(d)
    return d


def _consistency(deltas: list[float]) -> dict:
    row = {"mean": sum(deltas) / len(deltas), "max": max(deltas), **gpu_e2e.noise_and_flips(deltas)}
    return {"decode_vs_prefill": row, "radix_extend": row, "radix_decode": row, "cached_tokens": [716]}


def test_noise_and_flips_splits_at_flip():
    d = _deltas(200, 0.02, 7, seed=1)
    got = gpu_e2e.noise_and_flips(d)
    quiet = [x for x in d if x <= gpu_e2e.FLIP]
    assert (got["flips"], got["positions"]) == (7, 200)
    assert abs(got["mean_without_flips"] - statistics.fmean(quiet)) < 1e-4
    assert abs(got["median"] - statistics.median(d)) < 1e-4


def test_verdict_passes_noise_with_few_flips_and_fails_a_systematic_shift_or_many_flips():
    judge = lambda d: gpu_e2e.verdict({}, {"ours": {"consistency": _consistency(d)}})["checks"]  # noqa: E731
    ok = judge(_deltas(288, 0.03, 8))  # session 11's picture: bf16 noise, 8 flips in 288 positions
    assert all(v for k, v in ok.items()), ok
    # every position off by ~0.08 (a decode path reading a stale or wrong entry): the mean (0.08) passes MEAN_TOL,
    # the noise bound does not
    shifted = judge([0.08 + x for x in _deltas(288, 0.01, 0)])
    assert shifted["ours decode_vs_prefill"] and not shifted["ours decode_vs_prefill noise"], shifted
    # flips at 10 % of the positions with a small mean elsewhere: the flip bound fails
    many = judge(_deltas(288, 0.01, 29))
    assert not many["ours decode_vs_prefill flips"], many


def test_common_flags_set_or_drop_the_attention_backend():
    """--attention-backend of gpu_e2e.py: the named backend replaces COMMON_FLAGS' triton, server-default names none
    (each server at its own default), and every other flag keeps its value."""
    def pairs(flags):
        return {(f, flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else None)
                for i, f in enumerate(flags) if f.startswith("--")}

    base = pairs(gpu_e2e.COMMON_FLAGS)
    assert ("--attention-backend", "triton") in base
    others = {p for p in base if p[0] != "--attention-backend"}
    assert pairs(gpu_e2e.common_flags()) == base
    assert pairs(gpu_e2e.common_flags("fa3")) == others | {("--attention-backend", "fa3")}
    assert pairs(gpu_e2e.common_flags("server-default")) == others


def test_resolved_attention_reads_what_the_server_logged(tmp_path):
    """Oracle: lines in the wording of a real CPU test server's log (SGLang 0.5.17's ServerArgs dump, ours' backend
    line), where `decode_attention_backend=None` must not pass for the backend; a log without them says so."""
    log = ("server_args=ServerArgs(model_path='x', page_size=1, attention_backend='torch_native', "
           "decode_attention_backend=None, prefill_attention_backend=None)\n"
           "[2026-12-02] sglang-m3 MSA backend: 3 sparse layers (block 128, top-3) via torch reference, dense layers "
           "via TorchNativeAttnBackend\n")
    got = gpu_e2e.resolved_attention(log)
    assert got.startswith("attention_backend='torch_native'; page_size=1; sglang-m3 MSA backend: 3 sparse")
    assert got.endswith("via TorchNativeAttnBackend")
    assert gpu_e2e.resolved_attention("decode_attention_backend=None\nstarting\n") == "not in the log"
