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
    events = [{"cat": "kernel", "ph": "X", "name": n, "ts": ts, "dur": dur} for n, ts, dur in kernels]
    events.append({"cat": "cpu_op", "ph": "X", "name": "aten::mm", "ts": 0.0, "dur": 1e6})  # not a kernel
    with opener(path, "wt") as f:
        json.dump({"traceEvents": events}, f)


def _grid_oracle(kernels, tick=0.5):
    first = min(ts for _, ts, _ in kernels)
    last = max(ts + dur for _, ts, dur in kernels)
    n = round((last - first) / tick)
    busy = [False] * n
    for _, ts, dur in kernels:
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
    half = len(kernels) // 2  # two trace files, one gzipped: both are read
    _write(tmp_path / "a.trace.json", kernels[:half])
    _write(tmp_path / "b.trace.json.gz", kernels[half:], gzip.open)

    out = kernel_table(tmp_path, steps)
    assert out["us_per_step"] == {"gemm": 40.0, "side": 30.0, "attn": 20.0}
    assert out["total_us_per_step"] == 90.0 and out["kernels_per_step"] == 3.0
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
def test_unprofiled_decode_rate_on_a_cached_prompt(start_server, tiny_dir):
    """decode_rate against the tiny CPU server: the prompt is served from the radix cache (all but the one token
    SGLang always extends), the tokens asked for are decoded, and the client's per-token wall time covers the server's
    own end-to-end latency for the request (meta_info's e2e_latency: the server-side oracle) with little on top."""
    from profile_decode import decode_rate

    server = start_server(tiny_dir())
    ids = [(i * 37) % 400 + 5 for i in range(300)]  # 300: not a multiple of the tiny model's blocks
    servers_post = __import__("servers").post
    servers_post(server.url + "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1}})
    out = decode_rate(server, ids, 24)
    assert (out["tokens"], out["prompt_tokens"], out["cached_tokens"]) == (24, 300, 299), out
    latency = servers_post(server.url + "/generate", {"input_ids": ids, "sampling_params": {
        "max_new_tokens": 24, "temperature": 0, "ignore_eos": True}})["meta_info"]["e2e_latency"]
    again = decode_rate(server, ids, 24)
    # the server's latency of one such request is inside the client's wall time of the next (same work), up to the
    # run-to-run spread of a loaded 2-core machine (a factor 3 either way) plus HTTP's ~50 ms
    assert latency * 1e3 / 3 <= again["ms_per_token"] * 24 <= latency * 1e3 * 3 + 50, (latency, again)
