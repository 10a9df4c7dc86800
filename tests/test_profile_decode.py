"""benchmarks/profile_decode.py's trace arithmetic: kernels summed by name per step, and the GPU timeline (span and
idle time per step) that tells a step waiting on the host from a step of slower kernels. Oracle: a timeline drawn
on a grid of 0.5-µs ticks, each tick busy if any kernel covers it (independent of the sorted sweep under test)."""

from __future__ import annotations

import gzip
import json
import random
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))


def _write(path, kernels, opener=open):
    events = [{"cat": k[3] if len(k) > 3 else "kernel", "ph": "X", "name": k[0], "ts": k[1], "dur": k[2]}
              for k in kernels]
    events.append({"cat": "cpu_op", "ph": "X", "name": "aten::mm", "ts": 0.0, "dur": 1e6})  # not a kernel
    with opener(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def _grid_oracle(kernels, tick=0.5):
    first = min(k[1] for k in kernels)
    last = max(k[1] + k[2] for k in kernels)
    n = round((last - first) / tick)
    busy = [False] * n
    for _, ts, dur, *_cat in kernels:
        for i in range(round((ts - first) / tick), round((ts + dur - first) / tick)):
            busy[i] = True
    idle_ticks, runs, run = 0, [], 0
    for b in busy:
        if b:
            if run:
                runs.append(run)
            run = 0
        else:
            idle_ticks += 1
            run += 1
    return (last - first), idle_ticks * tick, max(runs, default=0) * tick


def test_kernel_table_sums_and_timeline(tmp_path):
    from profile_decode import kernel_table

    rng = random.Random(7)
    steps, kernels, t = 5, [], 1000.0
    for _ in range(steps):  # per step: a GEMM, two overlapping kernels on two streams, a host gap before the next
        kernels.append(("gemm", t, 40.0))
        kernels.append(("attn", t + 40.0, 20.0))
        kernels.append(("side", t + 45.0, 30.0))  # overlaps attn and runs past it
        t += 75.0 + rng.choice([0.5, 10.0, 60.0])
    # one long kernel on a side stream that spans two short ones with a gap between them (no idle there: a sweep
    # that forgot the long kernel's end would count 20 µs), then a copy after a 20-µs host gap: device work that
    # closes the gap in the timeline but is not a kernel in the table
    kernels += [("long", t, 50.0), ("short", t + 5.0, 5.0), ("short", t + 30.0, 5.0),
                ("Memcpy DtoD", t + 70.0, 8.0, "gpu_memcpy")]
    half = len(kernels) // 2  # two trace files, one gzipped: both are read
    _write(tmp_path / "a.trace.json", kernels[:half])
    _write(tmp_path / "b.trace.json.gz", kernels[half:], gzip.open)

    out = kernel_table(tmp_path, steps)
    assert out["us_per_step"] == {"gemm": 40.0, "side": 30.0, "attn": 20.0, "long": 10.0, "short": 2.0}
    assert out["total_us_per_step"] == 102.0 and out["kernels_per_step"] == 3.6
    span, idle, longest = _grid_oracle(kernels)
    assert out["span_us_per_step"] == pytest.approx(span / steps, abs=0.05)
    assert out["idle_us_per_step"] == pytest.approx(idle / steps, abs=0.05)
    assert out["longest_idle_us"] == pytest.approx(longest, abs=0.05)
    assert out["longest_idle_us"] == 60.0  # the largest host gap drawn above (5 steps of 3 choices: it is drawn)


def test_timeline_of_no_kernels_is_empty(tmp_path):
    from profile_decode import kernel_table

    out = kernel_table(tmp_path, 3)
    assert out["total_us_per_step"] == 0 and out["span_us_per_step"] is None and out["idle_us_per_step"] is None


@pytest.mark.server
def test_unprofiled_decode_rates_on_a_cached_prompt(start_server, tiny_dir):
    """decode_rates against the tiny CPU server: every request's prompt is served from the radix cache (all but the
    one token SGLang always extends), the tokens asked for are decoded, each client wall time covers the server's own
    e2e_latency for that request (the server-side oracle) with at most HTTP and JSON on top, and the per-step rates
    are the wall-time differences over the token differences."""
    from profile_decode import decode_rates
    from servers import post

    server = start_server(tiny_dir())
    ids = [(i * 37) % 400 + 5 for i in range(300)]  # 300: not a multiple of the tiny model's blocks
    post(server.url + "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}})
    out = decode_rates(server, ids, lengths=(1, 8, 24))
    reqs = out["requests"]
    assert [(r["tokens"], r["prompt_tokens"], r["cached_tokens"]) for r in reqs] == [(1, 300, 299), (8, 300, 299),
                                                                                      (24, 300, 299)], reqs
    for r in reqs:  # the client waited for the whole request, and not much longer (2-core CI: 0.5 s of slack)
        assert r["server_e2e_latency_ms"] <= r["wall_ms"] <= r["server_e2e_latency_ms"] + 500, r
    assert set(out["ms_per_step"]) == {"1-8", "8-24"}
    assert out["ms_per_step"]["8-24"] == pytest.approx((reqs[2]["wall_ms"] - reqs[1]["wall_ms"]) / 16, abs=1e-3)
    assert out["ms_per_step"]["8-24"] > 0  # 16 more decode steps take time
