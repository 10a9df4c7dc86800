"""The end-to-end benchmark harness (benchmarks/e2e.py) runs: its CPU smoke mode serves the tiny model and
drives SGLang's serving benchmark through it. Numbers are not judged here (speed is recorded in BENCHMARKS.md,
not tested); what is checked is that every request ran with exactly the lengths the workload asks for, and that
the bf16 and MXFP8 servers of one run (labels ours / ours_mxfp8, issue 10) are launched on the right
checkpoints and compared side by side."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, cpu_env

sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.server
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
        assert m["waves"] == WAVES, m
        assert m["output_throughput"] > 0 and m["median_ttft_ms"] > 0
        # the scheduler's log lines of the measured run: every measured prompt prefilled once (no warm-up request of
        # the serving benchmark's), some of it from the radix cache where the tiny vocabulary's prompts share a prefix
        sched = m["scheduler"]
        assert sched["prefill_new_tokens"] + sched["prefill_cached_tokens"] == n * inp, sched
        assert sched["prefill_batches"] >= 1 and sched["median_prefill_gap_ms"] > 0, sched
        # the server's processes over the measured run, by SGLang's process titles (no GPU: every interval)
        assert "sglang.launch_server" in m["cpu"] and any(k.startswith("sglang::scheduler") for k in m["cpu"]), m
        assert all(c["cores"] for c in m["cpu"].values()), m["cpu"]
    assert "| smoke (300/8, 2) |" in (tmp_path / "e2e.md").read_text()


def test_bench_measures_at_least_min_waves(tmp_path, monkeypatch):
    """The short, noisy 2K workload runs at least MIN_WAVES["2k"] measured waves whatever --waves says, the others
    exactly --waves; each after one warm-up wave of `concurrency` requests, and on a flushed radix cache without the
    serving benchmark's own warm-up request (the warm-up wave's prompts, drawn with the same seed, are the measured
    run's first ones: served from the cache, they made TTFT and throughput look better until session 12). SGLang's
    serving benchmark and the flush are replaced by stand-ins that record what they were asked."""
    import types
    from pathlib import Path

    import e2e

    calls = []

    def serving_bench(cmd, **kw):
        n = int(cmd[cmd.index("--num-prompts") + 1])
        warmups = cmd[cmd.index("--warmup-requests") + 1] if "--warmup-requests" in cmd else "default"
        calls.append(("bench", n, warmups))
        Path(cmd[cmd.index("--output-file") + 1]).write_text(json.dumps({"completed": n}) + "\n")

    monkeypatch.setattr(e2e.subprocess, "run", serving_bench)
    monkeypatch.setattr(e2e, "flush", lambda server: calls.append(("flush", server.name)))
    server = types.SimpleNamespace(name="ours", port=1, log=lambda: "")
    m = e2e.bench(server, tmp_path, "2k", e2e.WORKLOADS["2k"], tmp_path, waves=2)
    assert e2e.MIN_WAVES["2k"] > 2
    assert calls == [("bench", 64, "default"), ("flush", "ours"), ("bench", e2e.MIN_WAVES["2k"] * 64, "0")], calls
    assert (m["waves"], m["completed"]) == (e2e.MIN_WAVES["2k"], calls[2][1]), (calls, m)
    calls.clear()
    m = e2e.bench(server, tmp_path, "32k", e2e.WORKLOADS["32k"], tmp_path, waves=2)
    assert [c[:2] for c in calls] == [("bench", 8), ("flush", "ours"), ("bench", 16)] and m["waves"] == 2, (calls, m)


def test_mxfp8_label_gets_the_mxfp8_real_dims_config_and_a_side_by_side_row(tmp_path):
    import e2e

    bf16 = e2e.checkpoint(tmp_path, smoke=False, layers=4, dense_layers=1)
    mx = e2e.checkpoint(tmp_path, smoke=False, layers=4, dense_layers=1, quant=e2e.SERVER_QUANT["ours_mxfp8"])
    cfg_bf16, cfg_mx = (json.loads((d / "config.json").read_text()) for d in (bf16, mx))
    assert bf16 != mx and "quantization_config" not in cfg_bf16
    q = cfg_mx["quantization_config"]
    assert (q["quant_method"], q["weight_block_size"]) == ("mxfp8", [1, 32])
    assert {k: v for k, v in cfg_mx.items() if k != "quantization_config"} == cfg_bf16  # same model otherwise
    assert not (mx / "model.safetensors").exists()  # config only: --load-format dummy
    with pytest.raises(ValueError, match="no mxfp8"):
        e2e.checkpoint(tmp_path, smoke=True, quant="mxfp8")

    # Side by side: ratios are mxfp8 / bf16 of the same workload; a failed workload gives no ratio.
    m = lambda tput, tpot: {"output_throughput": tput, "median_ttft_ms": 10.0, "median_tpot_ms": tpot,  # noqa: E731
                            "median_itl_ms": 2 * tpot, "median_e2e_latency_ms": 100.0}
    servers = {"ours": {"workloads": {"2k": m(1000.0, 8.0), "32k": m(400.0, 20.0)}},
               "ours_mxfp8": {"workloads": {"2k": m(1250.0, 6.0), "32k": {"error": "boom"}}}}
    rows = {r["workload"]: r for r in e2e.compare(servers, {k: e2e.WORKLOADS[k] for k in ("2k", "32k")})}
    assert rows["2k"]["mxfp8_throughput_ratio"] == pytest.approx(1.25)
    assert rows["2k"]["mxfp8_tpot_ratio"] == pytest.approx(0.75)
    assert "mxfp8_throughput_ratio" not in rows["32k"] and "throughput_ratio" not in rows["2k"]  # no in-tree
    md = e2e.markdown({"servers": {k: {**v, "kv_pool_tokens": 7} for k, v in servers.items()},
                       "compare": list(rows.values()), "tp": 1})
    assert "| 2k | 1250 / 10 / 6.00 / 12.00 | 1.25 | 0.75 |" in md
    # ours vs the in-tree: the concurrency-1 target is judged on the ITL (the bench's TPOT is biased, see e2e.py)
    servers["intree"] = {"workloads": {"2k": m(800.0, 10.0)}}
    row = e2e.compare(servers, {"2k": e2e.WORKLOADS["2k"]})[0]
    assert row["throughput_ratio"] == pytest.approx(1.25) and row["itl_ratio"] == pytest.approx(0.8)
    assert row["e2e_latency_ratio"] == pytest.approx(1.0) and row["throughput_target"] == 1.05

    assert e2e.kv_pool_tokens("x\n[sched] max_total_num_tokens=123, chunked_prefill_size=8192\n") == 123
    assert e2e.kv_pool_tokens("no pool line") is None


def test_unknown_or_cpu_quantized_labels_are_refused(tmp_path):
    for servers, msg in (("ours,ours_fp4", "unknown server label"), ("ours_mxfp8", "quantized labels need a GPU")):
        proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "e2e.py"), "--smoke", "--servers", servers,
                               "--out", str(tmp_path), "--work", str(tmp_path / "work")],
                              env=cpu_env(), cwd=REPO, text=True, timeout=300, capture_output=True)
        assert proc.returncode == 2 and msg in proc.stderr, proc.stderr[-2000:]


def test_ratios_only_between_servers_of_the_same_flags_and_the_resolved_backend_is_read():
    """A --state may join calls of different flags (e.g. --attention-backend triton and server-default): ours ÷
    in-tree is then not a comparison, so no ratio is given and the table says why. What each server resolved (its
    ServerArgs line after the per-model overrides, and ours' dense delegate) is read from its log."""
    import e2e

    m = {"output_throughput": 100.0, "median_ttft_ms": 10.0, "median_tpot_ms": 2.0, "median_itl_ms": 2.0,
         "median_e2e_latency_ms": 50.0}
    pinned, default = ["--attention-backend", "triton"], []
    servers = {"ours": {"flags": pinned, "workloads": {"2k": m}}, "intree": {"flags": pinned, "workloads": {"2k": m}}}
    assert e2e.compare(servers, {"2k": e2e.WORKLOADS["2k"]})[0]["throughput_ratio"] == pytest.approx(1.0)
    servers["intree"]["flags"] = default
    row = e2e.compare(servers, {"2k": e2e.WORKLOADS["2k"]})[0]
    assert "throughput_ratio" not in row and row["flags_differ"]
    assert "different flags" in e2e.markdown({"servers": servers, "compare": [row], "tp": 1})
    alone = e2e.compare({"ours": servers["ours"]}, {"2k": e2e.WORKLOADS["2k"]})[0]  # the in-tree not run yet
    assert "flags_differ" not in alone and "different flags" not in e2e.markdown(
        {"servers": {"ours": servers["ours"]}, "compare": [alone], "tp": 1})

    log = ("[x] MiniMax-M3 on Hopper: attention_backend=fa3, page_size=128 (...)\n"
           "[x] server_args=ServerArgs(model_path='m', page_size=128, attention_backend='fa3', sampling_backend='x')\n")
    assert e2e.served_attention(log) == "fa3, page 128"
    log = ("[x] server_args=ServerArgs(model_path='m', page_size=1, attention_backend='m3_msa')\n"
           "[x] sglang-m3 MSA backend: 3 sparse layers (block 128, top-16) via Triton kernels, dense layers via "
           "TritonAttnBackend\n")
    assert e2e.served_attention(log) == "m3_msa over TritonAttnBackend, page 1"
    assert e2e.served_attention("no server args") is None


def test_a_state_does_not_merge_one_label_across_flags(tmp_path):
    """A label's workloads accumulate across calls in --state, so a call with other flags is refused before any
    server starts (it would otherwise file its workloads beside the earlier ones under the same label)."""
    state = tmp_path / "s.json"
    import e2e

    state.write_text(json.dumps({"servers": {"ours": {"flags": e2e.gpu_flags("triton") + ["--tp", "1"],
                                                      "workloads": {}}}}))
    cmd = [sys.executable, str(REPO / "benchmarks" / "e2e.py"), "--servers", "ours", "--attention-backend", "fa3",
           "--state", str(state), "--out", str(tmp_path / "o"), "--work", str(tmp_path / "w")]
    proc = subprocess.run(cmd, env=cpu_env(), cwd=REPO, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 2 and "run with other flags" in proc.stderr and "another --state" in proc.stderr, proc


def test_runs_of_one_label_are_kept_and_their_median_is_compared():
    """--runs (or a later call on the same --state) starts the label's server afresh: every run's workloads are
    kept, and the ratios use each metric's median over the runs that report it (one start per side did not settle
    the 128K batch-1 target). A partial report of a run replaces that run's earlier report; a failed workload counts
    only where no run measured it; a state written before runs were kept counts as one run; the first cold start-up
    stays, whatever later runs (a failed start included) report."""
    import e2e

    def m(itl, tput=100.0):
        return {"output_throughput": tput, "output_throughput_per_gpu": tput, "median_ttft_ms": 10.0,
                "median_tpot_ms": itl, "median_itl_ms": itl, "median_e2e_latency_ms": 50.0}

    old_state = {"flags": [], "triton_cache": "cold", "startup_s": 437.0, "capture_s": 297.0,
                 "workloads": {"128k-c1": m(2.14, 114.0)}}  # as session 18's state
    entry = e2e.merge_run(old_state, {"triton_cache": "warm", "startup_s": 90.0, "workloads": {}}, "r1")
    assert [r["run_id"] for r in entry["runs"]] == ["earlier", "r1"] and entry["workloads"]["128k-c1"] == m(2.14, 114.0)
    assert (entry["startup_s"], entry["warm_startup_s"]) == (437.0, 90.0)
    entry = e2e.merge_run(entry, {"triton_cache": "warm", "startup_s": 90.0,
                                  "workloads": {"128k-c1": m(1.81, 120.0), "32k-c1": {"error": "cut"}}}, "r1")
    entry = e2e.merge_run(entry, {"error": "server exited"}, "r-failed")  # a failed start: no start-up figures
    assert (entry["triton_cache"], entry["startup_s"], entry["capture_s"]) == ("cold", 437.0, 297.0)
    r2 = m(2.50, 130.0)
    r2["median_itl_ms"] = None  # a metric one run lacks: the median of the others
    entry = e2e.merge_run(entry, {"triton_cache": "warm", "startup_s": 95.0,
                                  "workloads": {"128k-c1": r2, "32k-c1": m(1.66)}}, "r2")
    assert [r["run_id"] for r in entry["runs"]] == ["earlier", "r1", "r-failed", "r2"]  # r1's partial report replaced
    w = entry["workloads"]["128k-c1"]
    # medians of (114, 120, 130) tok/s, (2.14, 1.81, 2.50) ms TPOT, (2.14, 1.81) ms ITL -- not the last run's values
    assert (w["output_throughput"], w["median_tpot_ms"], w["runs"]) == (120.0, 2.14, 3)
    assert w["median_itl_ms"] == pytest.approx((2.14 + 1.81) / 2) and w["tpot_ms_runs"] == [2.14, 1.81, 2.50]
    assert entry["workloads"]["32k-c1"] == m(1.66)  # r1's failure does not hide r2's measurement
    assert (entry["startup_s"], entry["warm_startup_s"]) == (437.0, 95.0)
    # Peak memory and the GPUs' NUMA nodes are set when a server stops: a run cut by a time limit reports without
    # them and must not erase the earlier run's (session 20: the in-tree's peak memory became None).
    entry["peak_mem_mib_per_gpu"], entry["gpu_numa_node"] = {0: 126516}, {0: 1}
    cut = e2e.merge_run(entry, {"triton_cache": "warm", "startup_s": 99.0, "workloads": {}}, "r3")
    assert (cut["peak_mem_mib_per_gpu"], cut["gpu_numa_node"]) == ({0: 126516}, {0: 1})
    later = e2e.merge_run(cut, {"workloads": {}, "peak_mem_mib_per_gpu": {0: 120000}, "gpu_numa_node": {0: 0}}, "r3")
    assert (later["peak_mem_mib_per_gpu"], later["gpu_numa_node"]) == ({0: 120000}, {0: 0})  # a stopped run's own
    only_failed = e2e.merge_run({}, {"workloads": {"2k": {"error": "boom"}}}, "x")
    assert only_failed["workloads"]["2k"] == {"error": "boom"}

    servers = {"ours": entry, "intree": {"workloads": {"128k-c1": m(2.5)}}}
    row = e2e.compare(servers, {"128k-c1": e2e.WORKLOADS["128k-c1"]})[0]
    assert row["tpot_ratio"] == pytest.approx(2.14 / 2.5) and row["throughput_ratio"] == pytest.approx(1.2)
    md = e2e.markdown({"servers": servers, "compare": [row], "tp": 1})
    assert "| 128k-c1 | ours | 3 | 2.14 / 1.81 | 2.14 / 1.81 / 2.50 |" in md


def test_gpu_samples_are_summarised_per_gpu():
    """nvidia-smi's csv lines (memory.used, utilization.gpu, clocks.sm, power.draw, temperature.gpu), timestamped,
    become a peak over all samples and, over a window's busy samples only, medians and extremes per GPU; "[N/A]"
    fields are skipped, other GPUs can be left out, a line that does not parse is dropped."""
    from gpu_memory import ServerSampler

    p = ServerSampler()
    for t, line in enumerate(("0, 1000, 100, 1980, 650.5, 61", "0, 1200, 97, 1755, [N/A], 63",
                              "0, 900, 100, 1800, 600.5, 62", "0, 950, 0, 345, 90.0, 70", "1, 5, 0, 345, 70, 30",
                              "0, 2000, 100, 1000, 700, 90", "garbage")):
        p.add(float(t), [line])
    assert p.peak_mib == {0: 2000, 1: 5}
    assert p.gpu_summary(0, 4, {0}) == {0: {"sm_mhz_median": 1800.0, "sm_mhz_min": 1755.0, "power_w_median": 625.5,
                                            "temp_c_max": 63.0, "samples": 3, "all_samples": 4}}
    assert p.gpu_summary(0, 4)[1]["samples"] == 0 and p.gpu_summary(0, 4)[1]["sm_mhz_median"] is None
    assert p.gpu_summary()[0]["samples"] == 4  # no window: all


def test_proc_stat_and_cpulist_parsing():
    """/proc/<pid>/stat: comm (field 2) may hold spaces and parentheses, so the fields are counted from its last
    ")"; utime + stime are fields 14 and 15, the core last run on field 39 (absent on old kernels: None). sysfs
    cpulists ("0-7,16-23") and back."""
    from proc_cpu import cpulist_text, parse_cpulist, parse_stat, process_kind

    fields = ["S", "41", *["0"] * 9, "250", "50", *["0"] * 22, "17", "13", "0"]  # fields 3.. : ppid 41, core 13
    assert parse_stat("1234 (sglang::sch (x) y)) " + " ".join(fields) + "\n") == ("sglang::sch (x) y)", 41, 300, 13)
    assert parse_stat("7 (a) " + " ".join(fields[:34])) == ("a", 41, 300, None)
    assert parse_cpulist("0-7,16-23\n") == set(range(8)) | set(range(16, 24)) and parse_cpulist("5") == {5}
    assert parse_cpulist("") == set() and cpulist_text({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8" and cpulist_text([]) == ""
    assert process_kind("sglang::scheduler_TP0", "sglang::schedul") == "sglang::scheduler_TP0"  # setproctitle
    assert process_kind("/v/bin/python3 -m sglang.launch_server --model-path m", "python3") == "sglang.launch_server"
    assert process_kind("/v/bin/python -c from multiprocessing.resource_tracker import main;main(5)",
                        "python") == "resource_tracker"
    assert process_kind("", "kworker") == "kworker"


def test_numa_nodes_of_a_known_core_map(tmp_path):
    """The NUMA column against a sysfs layout written here: node0 holds cores 0-1 and 4, node1 cores 2-3 and 5;
    a folder the node pattern does not take is skipped; a summary names the nodes of the cores its threads ran on."""
    from proc_cpu import cpu_summary, numa_node_of_core

    for name, cpus in (("node0", "0-1,4\n"), ("node1", "2-3,5\n"), ("node1x", "6\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cpulist").write_text(cpus)
    numa = numa_node_of_core(str(tmp_path))
    assert numa == {0: 0, 1: 0, 4: 0, 2: 1, 3: 1, 5: 1}
    assert numa_node_of_core(str(tmp_path / "absent")) == {}
    snap = lambda core, ticks: {7: ("sched", ticks, core, None, None, None)}  # noqa: E731
    one_node = cpu_summary([((0.0, snap(4, 0)), (1.0, snap(1, 10)))], hz=100, numa=numa)
    assert (one_node["sched"]["cores"], one_node["sched"]["numa_nodes"]) == ("1", "0")
    pairs = [((0.0, snap(4, 0)), (1.0, snap(4, 10))), ((1.0, snap(4, 10)), (2.0, snap(3, 20))),
             ((2.0, snap(3, 20)), (3.0, snap(6, 30)))]  # core 6 is on no node here: not named
    both = cpu_summary(pairs, hz=100, numa=numa)["sched"]
    assert (both["cores"], both["numa_nodes"], both["cpu_pct"]) == ("3-4,6", "0-1", 10.0)


def test_cpu_pct_from_two_snapshots():
    """CPU % of one core from the utime + stime delta at a known clock tick; the main thread's on-CPU and run-queue
    wait from schedstat's ns; processes of one kind summed; a pid in one snapshot only counts for its cores, not its
    time; no schedstat gives None. e2e.md shows it per run."""
    from proc_cpu import cpu_summary

    s0 = {10: ("sched", 1000, 3, 2000.0, 5 * 10**9, 1 * 10**9), 11: ("tok", 0, 1, None, None, None),
          12: ("tok", 50, 2, None, None, None)}
    s1 = {10: ("sched", 1150, 4, 3000.0, 6 * 10**9, 1 * 10**9 + 2 * 10**8), 11: ("tok", 20, 1, None, None, None),
          12: ("tok", 80, 2, None, None, None), 13: ("tok", 999, 0, None, None, None)}
    out = cpu_summary([((10.0, s0), (12.0, s1))], hz=100)
    # 150 ticks at 100 Hz over 2 s: 75 % of a core; schedstat: 1 s on-CPU, 0.2 s waiting over 2 s
    assert out["sched"] == {"cpu_pct": 75.0, "main_pct": 50.0, "wait_pct": 10.0, "cores": "4", "numa_nodes":
                            out["sched"]["numa_nodes"], "mhz_median": 3000.0, "processes": 1, "seconds": 2.0}
    assert (out["tok"]["cpu_pct"], out["tok"]["main_pct"], out["tok"]["processes"]) == (25.0, None, 3)
    assert out["tok"]["cores"] == "0-2" and out["tok"]["mhz_median"] is None
    assert cpu_summary([]) == {}

    # e2e.md: each run's processes using >= 1 % of a core, beside that run's ITL and the GPUs' NUMA nodes
    import e2e

    def run(itl, core):
        return {"output_throughput": 100.0, "median_ttft_ms": 10.0, "median_tpot_ms": itl, "median_itl_ms": itl,
                "median_e2e_latency_ms": 50.0, "cpu": {**out, "sched": {**out["sched"], "cores": core}}}

    entry = e2e.merge_run({}, {"workloads": {"128k-c1": run(1.74, "4")}, "gpu_numa_node": {0: 1}}, "r1")
    entry = e2e.merge_run(entry, {"workloads": {"128k-c1": run(2.05, "9")}, "gpu_numa_node": {0: 1}}, "r2")
    servers = {"ours": entry}
    md = e2e.markdown({"servers": servers, "compare": e2e.compare(servers, {"128k-c1": (1, 1, 1)}), "tp": 1})
    assert "CPU during the measured run" in md
    numa = out["sched"]["numa_nodes"] or "?"
    assert f"| 128k-c1 | ours | 1 (1.74) | sched | 75.0 | 50.0 / 10.0 | 4 | {numa} (1) | 3000.0 |" in md, md
    assert f"| 128k-c1 | ours | 2 (2.05) | sched | 75.0 | 50.0 / 10.0 | 9 | {numa} (1) | 3000.0 |" in md, md
    assert "| tok x3 | 25.0 | — / — | 0-2 |" in md, md
    # a summary that raised is recorded as such; the measurement and the table stay
    assert e2e.guarded(lambda *a: 1 / 0, 0, 1)["error"].startswith("ZeroDivisionError") and e2e.guarded(None) == {}
    for m in [entry["workloads"]["128k-c1"], *(r["workloads"]["128k-c1"] for r in entry["runs"])]:
        m.update(cpu={"error": "x"}, gpu={"error": "y"})
    md = e2e.markdown({"servers": servers, "compare": e2e.compare(servers, {"128k-c1": (1, 1, 1)}), "tp": 1})
    assert "| 128k-c1 | ours |" in md and "CPU during" not in md and "GPU during" not in md


def test_sampler_measures_this_process_cpu():
    """The sampler on this test process (a busy thread spinning): its CPU % over a window is at least half of what
    time.process_time says over the same window (generous: any 2-core machine under load), the core it ran on is a
    real one. Without nvidia-smi (or GPU rows) every interval of the window counts."""
    import hashlib
    import os
    import threading
    import time

    from gpu_memory import ServerSampler
    from proc_cpu import numa_node_of_core, parse_cpulist, snapshot

    stop = threading.Event()

    def spin():  # hashing a large buffer releases the GIL: a pure-Python loop would starve the sampler's thread
        data = b"x" * (1 << 20)
        while not stop.is_set():
            hashlib.sha256(data).digest()

    with ServerSampler(interval=0.1, root_pid=os.getpid()) as sampler:
        sampler._smi = False  # CPU only, also where nvidia-smi exists
        thread = threading.Thread(target=spin)
        thread.start()
        time.sleep(0.3)
        t0, c0 = time.monotonic(), time.process_time()
        time.sleep(2.0)
        t1, c1 = time.monotonic(), time.process_time()
        sampler.settle(t1)  # a sample taken after t1 is in: the window's last one is not on its way any more
        assert sampler.samples[-1][0] > t1
        stop.set()
        thread.join()
    expected = 100 * (c1 - c0) / (t1 - t0)
    child = subprocess.Popen(["sleep", "30"])  # the tree: a child is found, named by its comm
    try:
        for _ in range(50):  # until the child has exec'd sleep
            kinds = {v[0] for v in snapshot(os.getpid()).values()}
            if "sleep" in kinds:
                break
            time.sleep(0.05)
        assert "sleep" in kinds and snapshot(2**22 + 1) == {}, kinds  # and a pid that does not exist: nothing
    finally:
        child.kill()
        child.wait()
    out = sampler.cpu_summary(t0, t1)
    # This process's entry (a child another test left behind, e.g. multiprocessing's resource tracker, may add
    # entries, or share this process's name and add to its sum: the lower bound below still holds).
    c = out[snapshot(os.getpid())[os.getpid()][0]]
    assert c["processes"] >= 1 and c["seconds"] > 1.0, out
    assert expected > 20 and c["cpu_pct"] > 0.5 * expected, (expected, out)
    assert c["cores"] and all(0 <= core < os.cpu_count() for core in parse_cpulist(c["cores"])), out
    assert not numa_node_of_core() or c["numa_nodes"], out
    assert c["main_pct"] is None or 0 <= c["main_pct"] <= 110, out  # the main thread mostly sleeps here


# SGLang 0.5.17's scheduler / model-runner log lines (format of metrics_reporter.py and model_runner.py, as in the
# server logs under benchmarks/results), with values chosen so that every field differs from the others.
SCHED_LOG = """\
[2026-12-01 15:29:19] Prefill batch, #new-seq: 2, #new-token: 4096, #cached-token: 100, token usage: 0.00, \
#running-req: 0, #queue-req: 3, #pending-token: 0, cuda graph: False, input throughput (token/s): 2048.00
[2026-12-01 15:29:19] Decode batch, #running-req: 1, #token: 0, token usage: 0.00, cuda graph: True, \
gen throughput (token/s): 1.06, #queue-req: 0
[2026-12-01 15:29:20] Prefill batch, #new-seq: 1, #new-token: 2048, #cached-token: 0, token usage: 0.01, \
#running-req: 2, #queue-req: 1, #pending-token: 0, cuda graph: False, input throughput (token/s): 4096.00
[2026-12-01 15:29:21] Prefill batch, #new-seq: 4, #new-token: 512, #cached-token: 1536, token usage: 0.01, \
#running-req: 3, #queue-req: 0, #pending-token: 0, cuda graph: False, input throughput (token/s): 0.00
[2026-12-01 15:29:22] Decode batch, #running-req: 64, #token: 133632, token usage: 0.02, cuda graph: True, \
gen throughput (token/s): 865.15, #queue-req: 0
[2026-12-01 15:29:23] Decode batch, #running-req: 32, #token: 9000, token usage: 0.02, cuda graph: True, \
gen throughput (token/s): 400.00, #queue-req: 0
"""


def test_scheduler_summary_and_log_readers_on_sglang_lines():
    """e2e.scheduler_summary (the scheduler table of e2e.md) and the start-up readers, on log lines in SGLang's
    format. Oracle: the numbers worked out by hand from the lines above -- new tokens 4096 + 2048 + 512, cached
    100 + 0 + 1536, prefill gaps 4096 / 2048 s = 2000 ms and 2048 / 4096 s = 500 ms (a line at 0 tok/s has no
    gap), medians of three."""
    import e2e
    from gpu_memory import weight_memory_gb

    assert e2e.scheduler_summary(SCHED_LOG) == {
        "prefill_batches": 3, "prefill_new_tokens": 6656, "prefill_cached_tokens": 1636, "median_new_seqs": 2,
        "median_new_tokens": 2048, "max_queue_req": 3, "median_prefill_gap_ms": 1250.0, "decode_lines": 3,
        "median_decode_running_req": 32, "median_gen_throughput": 400.0}
    assert e2e.scheduler_summary("") == {
        "prefill_batches": 0, "prefill_new_tokens": 0, "prefill_cached_tokens": 0, "median_new_seqs": None,
        "median_new_tokens": None, "max_queue_req": 0, "median_prefill_gap_ms": None, "decode_lines": 0,
        "median_decode_running_req": None, "median_gen_throughput": None}
    startup = ("[x] Load weight end. elapsed=0.19 s, type=MiniMaxM3SparseForCausalLM, avail mem=92.17 GB, "
               "mem usage=46.95 GB.\n"
               "[x] Capture target decode CUDA graph end. elapsed=20.82 s, mem usage=0.33 GB, avail mem=17.99 GB.\n"
               "[x] Capture target verify CUDA graph end. elapsed=60.19 s, mem usage=0.04 GB, avail mem=35.94 GB.\n"
               "[x] Load weight end. elapsed=0.20 s, type=MiniMaxM3SparseForCausalLM, avail mem=139.02 GB, "
               "mem usage=0.11 GB.\n"
               "[x] Capture target decode CUDA graph end. elapsed=21.16 s, mem usage=0.04 GB, avail mem=35.90 GB.\n")
    assert weight_memory_gb(startup) == [46.95, 0.11]  # per rank, the weights (not the memory left)
    assert e2e.capture_seconds(startup) == 21.16  # the log's last decode capture
    assert e2e.capture_seconds(startup.rsplit("[x] Load", 1)[0]) == 20.82  # not the verify capture after it
    assert e2e.capture_seconds("no capture") is None
    assert e2e.kv_pool_tokens("max_total_num_tokens=5, x\nmax_total_num_tokens=123, y\n") == 123  # the last start


def test_every_ratio_is_ours_over_the_other():
    """compare's ratios with a different value per metric and side: each is ours (or ours_mxfp8) over the other."""
    import e2e

    ours = {"output_throughput": 300.0, "median_ttft_ms": 12.0, "median_tpot_ms": 3.0, "median_itl_ms": 2.0,
            "median_e2e_latency_ms": 70.0}
    intree = {"output_throughput": 200.0, "median_ttft_ms": 48.0, "median_tpot_ms": 4.0, "median_itl_ms": 8.0,
              "median_e2e_latency_ms": 35.0}
    mx = {"output_throughput": 450.0, "median_ttft_ms": 1.0, "median_tpot_ms": 1.5, "median_itl_ms": 1.0,
          "median_e2e_latency_ms": 1.0}
    servers = {"ours": {"workloads": {"32k-c1": ours}}, "intree": {"workloads": {"32k-c1": intree}},
               "ours_mxfp8": {"workloads": {"32k-c1": mx}}}
    row = e2e.compare(servers, {"32k-c1": e2e.WORKLOADS["32k-c1"]})[0]
    assert {k: row[k] for k in ("throughput_ratio", "ttft_ratio", "tpot_ratio", "itl_ratio", "e2e_latency_ratio",
                                "mxfp8_throughput_ratio", "mxfp8_tpot_ratio")} == pytest.approx(
        {"throughput_ratio": 1.5, "ttft_ratio": 0.25, "tpot_ratio": 0.75, "itl_ratio": 0.25, "e2e_latency_ratio": 2.0,
         "mxfp8_throughput_ratio": 1.5, "mxfp8_tpot_ratio": 0.5})
    assert (row["throughput_target"], row["itl_target"]) == (None, e2e.ITL_TARGET["32k-c1"])
