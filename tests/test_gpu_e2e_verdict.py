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


def test_verdict_counts_only_requested_servers_and_every_failed_one():
    """A call that asks for ours and the in-tree (session 24's `--servers ours,intree`) is judged on those two: the
    servers it did not run are not failures, one it ran that failed is, and so is a failed server joined from an
    earlier call's state. With nothing requested, all four servers are expected."""
    cons = {"consistency": _consistency(_deltas(288, 0.03, 8))}
    row = {"mean": 0.03, "max": 0.1}
    compare = {"ours_vs_intree": [{"len": 300, "prompt": row, "decode": row}]}
    two = {"ours": cons, "intree": {}}
    assert gpu_e2e.verdict(compare, two, ["ours", "intree"])["pass"]
    assert gpu_e2e.verdict(compare, two)["servers_missing_or_failed"] == ["ours_eager", "ours_torch"]
    broken = {**two, "intree": {"error": "boom"}}
    assert not gpu_e2e.verdict(compare, broken, ["ours", "intree"])["pass"]
    earlier = {**two, "ours_eager": {"error": "boom"}}
    assert gpu_e2e.verdict(compare, earlier, ["ours", "intree"])["servers_missing_or_failed"] == ["ours_eager"]
    far = {"ours_vs_intree": [{"len": 300, "prompt": {"mean": 0.5, "max": 3.0}, "decode": row}]}
    assert not gpu_e2e.verdict(far, two, ["ours", "intree"])["pass"]


def test_greedy_divergence_finds_the_first_differing_token_and_its_margins():
    """Oracle: hand-built decodes. Equal tokens report their largest logprob gap; differing ones the first step
    where the tokens part, each side's top-1 margin there, and the gap only over the steps before it."""
    a = [(5, -0.10, 2.0), (7, -0.50, 0.01), (9, -1.0, 0.3)]
    assert gpu_e2e.greedy_divergence(a, a) == {"equal": True, "first_diff": None, "max_dlp_before": 0.0}
    b = [(5, -0.13, 1.9), (8, -0.51, 0.02), (9, -4.0, 0.3)]
    got = gpu_e2e.greedy_divergence(a, b)
    assert (got["equal"], got["first_diff"], got["margins"]) == (False, 1, [0.01, 0.02])
    assert abs(got["max_dlp_before"] - 0.03) < 1e-9  # step 2's gap (3.0) lies after the divergence
    short = gpu_e2e.greedy_divergence(a, a[:2])  # one side stopped early: not equal, parted where it ended
    assert (short["equal"], short["first_diff"], short["margins"]) == (False, 2, [0.3, None])
    old = [(t, lp) for t, lp, _ in b]  # a state file's rows from before margins were kept
    assert gpu_e2e.greedy_divergence(a, old)["margins"] == [0.01, None]
