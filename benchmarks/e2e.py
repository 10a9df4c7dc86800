"""End-to-end serving benchmark (issues 4 §2, 9): ours vs SGLang's in-tree MiniMax-M3, identical flags.

Model: a real-dimension truncated M3 from the tiny writer's config-only mode (layer 0 dense, layers 1-3 sparse,
128 experts, the release's widths), `--load-format dummy`, bf16. The in-tree server is the same install with
our plugin switched off (`SGLANG_PLUGINS=none`). Load: `python -m sglang.benchmark.serving` with random token
ids of exact length (`random-ids`, `--tokenize-prompt`, range ratio 1), `ignore_eos` (its default), four
measured waves of requests per workload (`--waves`; at least eight for the short, noisy 2K one: MIN_WAVES) after one
unmeasured warm-up wave (`bench`). Start-up is timed from launch to the first answered /health_generate, and the
decode CUDA-graph capture time is read from the server log; each server label has its own Triton cache under
--work, cold at its first start (as the capture target is stated), warm in later calls on the same host.

    python benchmarks/e2e.py --out $OUT --servers ours            # one server per device call fits 10 min
    python benchmarks/e2e.py --out $OUT --servers ours --workloads 32k-c1,128k-c1   # a subset
    python benchmarks/e2e.py --out $OUT --servers intree          # results accumulate in --state
    python benchmarks/e2e.py --smoke --out /tmp/e2e_smoke         # CPU: tiny model, tiny load (harness check)
    python benchmarks/e2e.py --out $OUT --servers ours --layers 60 --dense-layers 3 --tp 8 --workloads 2k,32k,128k
                                                                  # full size (issue 12): the whole model, 8 GPUs
    python benchmarks/e2e.py --out $OUT --servers ours --layers 18 --dense-layers 3 --tp 2 --workloads 2k,32k,128k
                                                                  # the most layers 2 x H200 hold (full_size.py)
    python benchmarks/e2e.py --out $OUT --servers ours,ours_mxfp8 --workloads 2k,32k --waves 2
                                                                  # bf16 vs MXFP8 (issue 10), side by side
    python benchmarks/e2e.py --out $OUT --servers intree --attention-backend server-default --state /tmp/e2e/def.json
                                                                  # each server's own backend choice (the in-tree:
                                                                  # fa3, page size 128 on Hopper); --extra-flags adds more
    python benchmarks/e2e.py --out $OUT --servers ours --workloads 128k-c1 --runs 3   # three fresh server starts:
                                                                  # medians compared, each run's ITL in the table

Both servers get the same flags (GPU_FLAGS, `--attention-backend`, `--extra-flags`); a --state joining calls of
different flags gives no ours ÷ in-tree ratio. Each server's resolved attention backend and page size (its log's
ServerArgs line) is in the start-up table.

Server labels: `ours` and `intree` serve the bf16 config; `ours_mxfp8` is ours serving the same config with the
MXFP8 release's quantization_config (`sglang_m3.tiny --config-only --real-dims --quant mxfp8`; dummy fp8 weights
and scales, served as 128x128 block FP8 on sm90 by the plugin's m3_mxfp8_block, Triton block-FP8 GEMMs). Per server:
weights per rank (SGLang's "Load weight end" line), the KV pool it could then allocate (max_total_num_tokens, the
same --mem-fraction-static for all), and nvidia-smi's peak per GPU (which, with the pool sized to the memory
fraction, is about the same for every server: the weights saved go to the KV pool). During each measured run, one
sampler (gpu_memory.ServerSampler, every 0.5 s, the same one that gives the peak) records the GPUs' SM clock, power
and temperature, and the server's processes' CPU use, cores, NUMA nodes and clock (proc_cpu.py): `gpu` and `cpu`
per workload, each run's in e2e.json's `runs`.

Writes e2e.json and e2e.md under --out (the device host returns at most 8 files); checkpoints, server logs and
the serving benchmark's own outputs go to --work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from servers import Server, flush  # noqa: E402
from gpu_memory import ServerSampler, weight_memory_gb  # noqa: E402
from gpu_quant import ENV as QUANT_ENV  # noqa: E402  (the Triton block-FP8 GEMM; DeepGEMM's JIT is not installed)

# name: (input tokens, output tokens, concurrency). The concurrency-1 workloads measure small-batch decode (TPOT at
# batch 1), where sparse attention should pay most and where our decode was behind (issue 9). 128k-c1-decode is a
# diagnostic, no target: 128k-c1's measured run is ~75 % prefill (TTFT ~1.7 s, 256 tokens at ~2 ms), so its clock and
# CPU samples describe prefill; 1792 new tokens (the most the 133120-token context leaves) make it ~2/3 decode.
WORKLOADS = {"2k": (2048, 256, 64), "32k": (32768, 256, 8), "128k": (131072, 256, 2),
             "32k-c1": (32768, 256, 1), "128k-c1": (131072, 256, 1), "128k-c1-decode": (131072, 1792, 1)}
SMOKE_WORKLOADS = {"smoke": (300, 8, 2)}
WAVES = 4  # requests per workload = WAVES × concurrency
# Fewest measured waves per workload, whatever --waves says: the 2K workload's waves are short (~3 s each on an H200)
# and its figure noisy -- session 9, two runs of identical kernels at two waves: 5448 vs 5617 tok/s (3 %), median TTFT
# 1528 vs 1151 ms; same-run ours / in-tree 0.96 at two waves, 1.09 at four. Eight waves cost ~25 s per server.
MIN_WAVES = {"2k": 8}
GPU_FLAGS = ["--load-format", "dummy", "--dtype", "bfloat16", "--trust-remote-code",
             "--disable-prefill-cuda-graph", "--cuda-graph-max-bs", "64", "--context-length", "133120",
             "--mem-fraction-static", "0.85"]
SMOKE_FLAGS = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "16384", "--sleep-on-idle"]
SERVER_ENV = {"ours": {}, "intree": {"SGLANG_PLUGINS": "none"}, "ours_mxfp8": QUANT_ENV}
SERVER_QUANT = {"ours_mxfp8": "mxfp8"}  # label -> the checkpoint's quantization (the others: bf16)
# --attention-backend for both servers. "triton" is the protocol of sessions 4-15 (the dense layers of both on SGLang's
# Triton backend, page size 1). SERVER_DEFAULT leaves the choice to each server, as a user who names no backend gets
# it: on Hopper the in-tree then picks fa3 with page size 128 (sglang/srt/arg_groups/overrides.py, MiniMax-M3), ours
# m3_msa at page size 1 over fa3 on Hopper where sgl_kernel's FA3 module imports, else over Triton (session 17 on:
# plugin._dense_backend_name); the start-up table says what each server resolved.
SERVER_DEFAULT = "server-default"


def gpu_flags(attention_backend: str = "triton") -> list[str]:
    """GPU_FLAGS with `--attention-backend attention_backend` (none for SERVER_DEFAULT): what every GPU script of this
    folder launches both servers with."""
    return [*GPU_FLAGS, *([] if attention_backend == SERVER_DEFAULT else ["--attention-backend", attention_backend])]


# Targets of issue 9 (H200, same run): ours / in-tree output throughput, ours / in-tree decode time per token at
# concurrency 1, and the cold decode-graph capture time. The decode time per token is judged on the median ITL (each
# chunk's gap divided by its new tokens), which is what the target means. Until session 11 the checkpoint shipped
# the tiny byte-level tokenizer (a few hundred ids) with the release's vocabulary of 200064, which biased two things,
# for both servers: sglang.benchmark.serving stamps TTFT at the first streamed chunk with non-empty text, and a
# dummy-weight model emits arbitrary ids, most of which rendered as no text (TTFT absorbed decode steps, TPOT =
# (latency - TTFT) / (tokens - 1) shrank: 32K c1, session 7, TPOT 0.89 ms, ITL 1.75 ms, GPU time per step 1.74 ms);
# and its random-ids prompts are runs of consecutive ids modulo the tokenizer's vocab_size, so with a few hundred
# ids they were periodic and most were identical (session 11, 2K: 67 % of the measured input tokens were radix-cache
# hits in both servers). Config-only checkpoints now carry a tokenizer filled to the model's vocabulary
# (tiny_tokenizer.build_tokenizer(vocab_size)): every id renders, prompts rarely repeat. Results before that are
# comparable between the two servers of one run only.
THROUGHPUT_TARGET = {"2k": 1.05, "32k": 1.2, "128k": 1.2}
ITL_TARGET = {"32k-c1": 0.85, "128k-c1": 0.85}
CAPTURE_TARGET_S = 30


def checkpoint(out: Path, smoke: bool, layers: int = 4, dense_layers: int = 1, quant: str | None = None) -> Path:
    """The directory a server is launched on: the tiny fp32 checkpoint (smoke) or a config-only real-dimension one
    (`quant` "mxfp8": with the MXFP8 release's quantization_config)."""
    from sglang_m3.tiny import write_tiny_checkpoint

    if smoke:  # real (random) weights: the CPU server loads them
        if quant:
            raise ValueError(f"--smoke serves the tiny fp32 model on CPU: no {quant} there")
        return write_tiny_checkpoint(out / "ckpt_tiny", flat=True, dtype="float32")
    return write_tiny_checkpoint(out / f"ckpt_real_dims_{layers}l_{dense_layers}d{'_' + quant if quant else ''}",
                                 flat=True, config_only=True, real_dims=True, num_hidden_layers=layers,
                                 dense_layers=dense_layers, quant=quant)


def kv_pool_tokens(log: str) -> int | None:
    """KV-pool size in tokens as the scheduler logs it ("max_total_num_tokens=123456, ...")."""
    found = re.findall(r"max_total_num_tokens=(\d+)", log)
    return int(found[-1]) if found else None


def bench(server: Server, ckpt: Path, name: str, workload: tuple, work: Path, waves: int = WAVES,
          sampler: ServerSampler | None = None) -> dict:
    """One workload: an unmeasured warm-up wave (concurrency requests of the same shape), then `waves` measured
    waves (at least MIN_WAVES[name]; the count used is in the result). Why the warm-up: the first batches of a new
    shape JIT-compile Triton kernels not in the cache (a fused-MoE config tuned since the cache was filled, a new
    batch size), and that compile landed inside the measured duration
    (session 8: ours' first workload after start-up ran with new MoE configs; session 7: a 128K x 2 outlier on a
    freshly started server). SGLang's bench would send one warm-up request only, of the first prompt. The measured
    run then starts on a flushed radix cache, so no measured prompt is a cache hit. `sampler` (the server's, running):
    its samples of the measured run's window give `gpu` (clocks, power, temperature per GPU) and `cpu` (the server's
    processes' CPU use, cores, NUMA nodes, clock); {} without it."""
    inp, outp, conc = workload

    def run(tag: str, prompts: int, *extra: str) -> dict:
        result = work / f"bench_{server.name}_{name}{tag}.jsonl"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang", "--port", str(server.port),
               "--model", str(ckpt), "--dataset-name", "random-ids", "--tokenize-prompt", "--random-range-ratio", "1",
               "--random-input-len", str(inp), "--random-output-len", str(outp), "--num-prompts", str(prompts),
               "--max-concurrency", str(conc), "--disable-tqdm", "--output-file", str(result), *extra]
        with open(work / f"bench_{server.name}_{name}{tag}.log", "w") as f:
            subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, timeout=1800)
        return json.loads(result.read_text().strip().splitlines()[-1])

    run("_warmup", conc)
    waves = max(waves, MIN_WAVES.get(name, 0))
    # The measured run starts on an empty radix cache and sends no warm-up request of its own: the warm-up wave's
    # prompts (same seed) are its first ones, and were served from the cache until session 12. (flush retries the
    # 400 SGLang answers while a finished request is still leaving; the bench's own --flush-cache does not.)
    flush(server)
    log_start = len(server.log())
    t0 = time.monotonic()
    m = run("", waves * conc, "--warmup-requests", "0")
    t1, gpus = time.monotonic(), visible_gpus()
    if sampler is not None:
        sampler.settle(t1)  # the window's last sample may still be on its way
    # ITL and end-to-end latency too: a cross-check of the TPOT (SGLang's bench derives it per request from the
    # latency, TTFT and completion_tokens).
    return {"waves": waves, **{k: m.get(k) for k in ("output_throughput", "median_ttft_ms", "median_tpot_ms",
                                                     "median_itl_ms", "median_e2e_latency_ms", "completed",
                                                     "duration", "total_input_tokens", "total_output_tokens")},
            "scheduler": scheduler_summary(server.log()[log_start:]),
            "gpu": guarded(sampler and sampler.gpu_summary, t0, t1, gpus),
            "cpu": guarded(sampler and sampler.cpu_summary, t0, t1, gpus)}


def guarded(summary, *args) -> dict:
    """summary(*args), {} without a summary, {"error": ...} where it raises: the workload's measurement stays."""
    try:
        return summary(*args) if summary else {}
    except Exception as e:  # noqa: BLE001
        return {"error": repr(e)[:300]}


def visible_gpus() -> set[int] | None:
    """This process's GPUs by nvidia-smi index (CUDA_VISIBLE_DEVICES), None for all: nvidia-smi lists every GPU of
    the host, and another lane of gpu_round.sh may be using the others."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return {int(i) for i in visible.split(",") if i.strip().isdigit()} if visible else None


_PREFILL_LINE = re.compile(r"Prefill batch[^,]*, #new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+),.*?"
                           r"#running-req: (\d+), #queue-req: (\d+),.*?input throughput \(token/s\): ([\d.]+)")
_DECODE_LINE = re.compile(r"Decode batch[^,]*, #running-req: (\d+),.*?gen throughput \(token/s\): ([\d.]+)")


def scheduler_summary(log: str) -> dict:
    """What the scheduler did during a measured run, from SGLang's own log lines (a scheduler-level view of where the
    time went, at no profiling cost; bench() turns the serving benchmark's own warm-up request off). Per
    "Prefill batch" line: new requests and tokens, and the wall time since the previous prefill line (new tokens /
    its "input throughput"), which inside a burst of back-to-back prefill batches is one batch's wall time; per
    "Decode batch" line (every 40 decode steps): batch size and "gen throughput".
    Medians, so one slow batch (a JIT compile) does not move them."""
    import statistics

    med = lambda xs: round(statistics.median(xs), 2) if xs else None  # noqa: E731
    prefill = [tuple(float(g) for g in mt.groups()) for mt in _PREFILL_LINE.finditer(log)]
    decode = [tuple(float(g) for g in mt.groups()) for mt in _DECODE_LINE.finditer(log)]
    return {"prefill_batches": len(prefill), "prefill_new_tokens": int(sum(p[1] for p in prefill)),
            "prefill_cached_tokens": int(sum(p[2] for p in prefill)),
            "median_new_seqs": med([p[0] for p in prefill]), "median_new_tokens": med([p[1] for p in prefill]),
            "max_queue_req": int(max((p[4] for p in prefill), default=0)),
            "median_prefill_gap_ms": med([1e3 * p[1] / p[5] for p in prefill if p[5] > 0]),
            "decode_lines": len(decode), "median_decode_running_req": med([d[0] for d in decode]),
            "median_gen_throughput": med([d[1] for d in decode])}


def served_attention(log: str) -> str | None:
    """"<attention backend>, page <n>" from the last ServerArgs line of a server log (what the server resolved after
    the per-model overrides), plus the dense delegate ours logs ("... dense layers via TritonAttnBackend")."""
    args = re.findall(r"ServerArgs\([^\n]*?attention_backend='([^']*)'[^\n]*", log)
    pages = re.findall(r"ServerArgs\([^\n]*?\bpage_size=(\w+)", log)
    dense = re.findall(r"dense layers via (\w+)", log)
    if not args:
        return None
    return f"{args[-1]}{' over ' + dense[-1] if dense else ''}, page {pages[-1] if pages else '?'}"


def capture_seconds(log: str) -> float | None:
    """Decode CUDA-graph capture time as SGLang logs it ("Capture ... end. elapsed=12.34 s")."""
    found = re.findall(r"Capture [^\n]*?decode[^\n]*? end\. elapsed=([\d.]+) s", log)
    return float(found[-1]) if found else None


def triton_cache(work: Path, name: str) -> Path:
    """The Triton cache of server label `name` under --work (shared with profile_decode.py): absent means cold."""
    return work / f"triton_{name}"


def run_server(name: str, ckpt: Path, flags: list[str], workloads: dict, work: Path, port: int, gpus: int = 1,
               waves: int = WAVES, progress=lambda info: None) -> dict:
    """Start one server, run the workloads, stop it. `progress(info)` gets the partial result after start-up and
    after each workload, so a run cut by its time limit keeps what it measured."""
    # One Triton cache per server label under --work: the first start is cold (start-up and capture as the
    # target is stated); a later call on the same host (the rest of the workloads, another --layers/--tp) starts
    # warm instead of paying the in-tree's ~7 min cold start again, and says so ("triton_cache").
    cache = triton_cache(work, name)
    cold = not cache.exists()
    env = {**SERVER_ENV[name], "TRITON_CACHE_DIR": str(cache)}
    # One sampler from launch to stop: peak memory per GPU over the server's life (empty on CPU); GPU clocks and
    # the server's processes' CPU use over each measured window (bench)
    with ServerSampler() as sampler:
        server = Server(name, ckpt, flags, log_dir=work, port=port, env=env)
        sampler.root_pid = server.proc.pid
        try:
            server.wait(timeout=1200)
            info = {"triton_cache": "cold" if cold else "warm", "startup_s": round(server.startup_s, 1),
                    "capture_s": capture_seconds(server.log()),
                    "weights_gb_per_rank": weight_memory_gb(server.log()),
                    "kv_pool_tokens": kv_pool_tokens(server.log()), "checkpoint": ckpt.name,
                    "attention": served_attention(server.log()), "flags": flags, "workloads": {}}
            progress(info)
            for wname, workload in workloads.items():
                try:
                    m = bench(server, ckpt, wname, workload, work, waves, sampler)
                    m["output_throughput_per_gpu"] = m["output_throughput"] / gpus
                    info["workloads"][wname] = m
                except Exception as e:  # noqa: BLE001 -- one failed workload must not hide the others
                    info["workloads"][wname] = {"error": repr(e)[:500]}
                progress(info)
        except Exception as e:  # noqa: BLE001
            info = {"error": repr(e)[:2000], "log_tail": server.log()[-3000:], "flags": flags}
        finally:
            server.stop()
    gpus = visible_gpus()
    info["peak_mem_mib_per_gpu"] = {i: mib for i, mib in sampler.peak_mib.items() if gpus is None or i in gpus}
    info["gpu_numa_node"] = {i: n for i, n in sampler.gpu_numa.items() if gpus is None or i in gpus}
    return info


RUN_METRICS = ("output_throughput", "output_throughput_per_gpu", "median_ttft_ms", "median_tpot_ms", "median_itl_ms",
               "median_e2e_latency_ms")


def merge_run(earlier: dict, info: dict, run_id: str) -> dict:
    """A label's entry in --state after its run `run_id` reported `info` (partial while it runs: the same run_id
    replaces its own earlier report). Every run's workloads are kept under "runs"; "workloads" holds, per workload,
    the one run that measured it or, over several runs (fresh servers: `--runs`, or later calls on the same state),
    each of RUN_METRICS' median over the runs that report it, with the per-run ITL / TPOT beside it (the other
    fields, e.g. scheduler and gpu, are the last run's) -- one server start per side did not settle the 128K
    batch-1 target (sessions 18 and 19: ITL 2.14 and 1.81 ms). A run's failed workload counts only where no run
    measured it. Start-up figures: the first cold run's (a failed start, which has none, does not erase them), the
    last warm run's start-up beside them; peak memory and the GPUs' NUMA nodes (known once a server stops) the
    last run's that has them. A state written before runs were kept counts as one run. Every run in a state is
    pooled: start a new --state after a code change."""
    runs = list(earlier.get("runs") or ([{"run_id": "earlier", "workloads": earlier["workloads"],
                                           **{k: earlier.get(k) for k in ("triton_cache", "startup_s", "capture_s")}}]
                                         if earlier.get("workloads") else []))
    runs = [r for r in runs if r["run_id"] != run_id]
    runs.append({"run_id": run_id, **{k: info.get(k) for k in ("triton_cache", "startup_s", "capture_s")},
                 "workloads": info.get("workloads", {})})
    workloads = {}
    for w in dict.fromkeys(w for r in runs for w in r["workloads"]):
        done = [r["workloads"][w] for r in runs if "error" not in r["workloads"].get(w, {"error": None})]
        if len(done) > 1:
            med = {k: statistics.median(vals) for k in RUN_METRICS
                   if (vals := [m[k] for m in done if m.get(k) is not None])}
            workloads[w] = {**done[-1], **med, "runs": len(done), "itl_ms_runs": [m.get("median_itl_ms") for m in done],
                            "tpot_ms_runs": [m.get("median_tpot_ms") for m in done]}
        else:
            workloads[w] = done[0] if done else [r["workloads"][w] for r in runs if w in r["workloads"]][-1]
    merged = {**info, "runs": runs, "workloads": workloads}
    for k in ("peak_mem_mib_per_gpu", "gpu_numa_node"):  # set when a server stops: a run cut before keeps the last
        if merged.get(k) is None and earlier.get(k) is not None:
            merged[k] = earlier[k]
    started = [r for r in runs if r.get("startup_s") is not None]
    first = next((r for r in started if r.get("triton_cache") == "cold"), started[0] if started else None)
    if first:
        merged.update({k: first[k] for k in ("triton_cache", "startup_s", "capture_s")})
        warm = [r for r in started if r is not first]
        if warm:
            merged["warm_startup_s"] = warm[-1]["startup_s"]
    return merged


def measured_runs(info: dict, workload: str) -> list[dict]:
    """A label's measurements of `workload`, one per run that measured it (a state before runs were kept: its one)."""
    runs = [r["workloads"].get(workload) for r in info.get("runs") or []] or [info.get("workloads", {}).get(workload)]
    return [m for m in runs if m and "error" not in m]


def compare(servers: dict, workloads: dict) -> list[dict]:
    """Per workload: each server's numbers, ours ÷ in-tree ratios (issue 9 targets) and ours_mxfp8 ÷ ours
    (`mxfp8_*_ratio`, issue 10) where both ran."""
    rows = []
    for wname, (inp, outp, conc) in workloads.items():
        row = {"workload": wname, "input": inp, "output": outp, "concurrency": conc}
        for name in SERVER_ENV:
            row[name] = servers.get(name, {}).get("workloads", {}).get(wname)
        mx, bf = row["ours_mxfp8"], row["ours"]
        if mx and bf and "error" not in mx and "error" not in bf:
            row["mxfp8_throughput_ratio"] = mx["output_throughput"] / bf["output_throughput"]
            row["mxfp8_tpot_ratio"] = mx["median_tpot_ms"] / bf["median_tpot_ms"]
        ours, intree = row["ours"], row["intree"]
        flags = [servers.get(n, {}).get("flags") for n in ("ours", "intree")]
        if None not in flags and flags[0] != flags[1]:  # (a --state joining runs of different flags: the table says why)
            row["flags_differ"] = True
        if ours and intree and "error" not in ours and "error" not in intree and not row.get("flags_differ"):
            row["throughput_ratio"] = ours["output_throughput"] / intree["output_throughput"]
            row["ttft_ratio"] = ours["median_ttft_ms"] / intree["median_ttft_ms"]
            row["tpot_ratio"] = ours["median_tpot_ms"] / intree["median_tpot_ms"]
            if ours.get("median_itl_ms") and intree.get("median_itl_ms"):
                row["itl_ratio"] = ours["median_itl_ms"] / intree["median_itl_ms"]
                row["e2e_latency_ratio"] = ours["median_e2e_latency_ms"] / intree["median_e2e_latency_ms"]
            row["throughput_target"] = THROUGHPUT_TARGET.get(wname)
            row["itl_target"] = ITL_TARGET.get(wname)
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    fmt = lambda m: ("—" if not m else m.get("error", "")[:40] if "error" in m else  # noqa: E731
                     f"{m['output_throughput']:.0f} / {m['median_ttft_ms']:.0f} / {m['median_tpot_ms']:.2f}"
                     + (f" / {m['median_itl_ms']:.2f}" if m.get("median_itl_ms") else ""))
    lines = ["| workload (in/out, conc) | ours tok/s / TTFT ms / TPOT ms / ITL ms | in-tree (same) "
             "| ours ÷ in-tree throughput (target) | ours ÷ in-tree TTFT | ours ÷ in-tree e2e latency "
             "| ours ÷ in-tree ITL (target) |",
             "|---|---|---|---|---|---|---|"]
    target = lambda r, k, op: f" ({op} {r[k]})" if r.get(k) is not None else ""  # noqa: E731
    for r in results["compare"]:
        ratio = (f"{r['throughput_ratio']:.2f}{target(r, 'throughput_target', '≥')}"
                 if "throughput_ratio" in r else "—")
        ttft = f"{r['ttft_ratio']:.2f}" if "ttft_ratio" in r else "—"
        e2e_lat = f"{r['e2e_latency_ratio']:.2f}" if "e2e_latency_ratio" in r else "—"
        itl = f"{r['itl_ratio']:.2f}{target(r, 'itl_target', '≤')}" if "itl_ratio" in r else "—"
        lines.append(f"| {r['workload']} ({r['input']}/{r['output']}, {r['concurrency']}) | {fmt(r['ours'])} | "
                     f"{fmt(r['intree'])} | {ratio} | {ttft} | {e2e_lat} | {itl} |")
    if any(r.get("ours_mxfp8") for r in results["compare"]):
        lines += ["", "| workload | ours_mxfp8 tok/s / TTFT ms / TPOT ms | ours_mxfp8 ÷ ours throughput | "
                  "ours_mxfp8 ÷ ours TPOT |", "|---|---|---|---|"]
        for r in results["compare"]:
            ratio = lambda k: f"{r[k]:.2f}" if k in r else "—"  # noqa: E731
            lines.append(f"| {r['workload']} | {fmt(r['ours_mxfp8'])} | {ratio('mxfp8_throughput_ratio')} | "
                         f"{ratio('mxfp8_tpot_ratio')} |")
    lines += ["", "Scheduler, measured run (SGLang's log lines, `scheduler_summary`; from session 12 on a flushed "
              "radix cache without the serving benchmark's warm-up request): prefill batches, prefill tokens served "
              "from the "
              "radix cache (of all prefilled), median new requests / tokens per batch, median wall time between "
              "prefill lines, largest queue, median decode batch size and gen throughput", "",
              "| workload | server | prefill batches | cached tokens | new req / tokens | prefill gap ms | max queue "
              "| decode bs | gen tok/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["compare"]:
        for name in SERVER_ENV:
            sch = (r.get(name) or {}).get("scheduler")
            if sch:
                cached = sch.get("prefill_cached_tokens")
                total = (cached or 0) + (sch.get("prefill_new_tokens") or 0)
                lines.append(f"| {r['workload']} | {name} | {sch['prefill_batches']} | {cached} of {total} | "
                             f"{sch['median_new_seqs']} / "
                             f"{sch['median_new_tokens']} | {sch['median_prefill_gap_ms']} | {sch['max_queue_req']} | "
                             f"{sch['median_decode_running_req']} | {sch['median_gen_throughput']} |")
    runs = [(r["workload"], name, r[name]) for r in results["compare"] for name in SERVER_ENV
            if (r.get(name) or {}).get("runs")]
    if runs:
        lines += ["", "Several runs (fresh server starts): the table above gives each metric's median over them", "",
                  "| workload | server | runs | ITL ms per run | TPOT ms per run |", "|---|---|---|---|---|"]
        lines += [f"| {w} | {name} | {m['runs']} | {' / '.join(f'{x:.2f}' for x in m['itl_ms_runs'] if x)} | "
                  f"{' / '.join(f'{x:.2f}' for x in m['tpot_ms_runs'] if x)} |" for w, name, m in runs]
    clocks = [(r["workload"], name, gpu, g) for r in results["compare"] for name in SERVER_ENV
              for gpu, g in ((r.get(name) or {}).get("gpu") or {}).items()
              if isinstance(g, dict) and g.get("samples")]
    if clocks:
        lines += ["", "GPU during the measured run (nvidia-smi every 0.5 s, samples with the GPU busy; the last run where there were several)",
                  "", "| workload | server | GPU | SM MHz median / min | power W median | temperature °C max |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {w} | {name} | {gpu} | {g['sm_mhz_median']} / {g['sm_mhz_min']} | {g['power_w_median']} | "
                  f"{g['temp_c_max']} |" for w, name, gpu, g in clocks]
    cpu = [(r["workload"], name, k, m, kind, c) for r in results["compare"] for name in SERVER_ENV
           for k, m in enumerate(measured_runs(results["servers"].get(name) or {}, r["workload"]), 1)
           for kind, c in (m.get("cpu") or {}).items()
           if isinstance(c, dict) and (c.get("cpu_pct") or 0) >= 1]
    if cpu:
        dash = lambda x: "—" if x is None else x  # noqa: E731
        itl = lambda m: f"{m['median_itl_ms']:.2f}" if m.get("median_itl_ms") else "—"  # noqa: E731
        lines += ["", "CPU during the measured run (the server's processes using ≥ 1 % of a core, over the intervals "
                  "of the GPU table's busy samples; every run): CPU % of one core (all threads), the main thread's "
                  "on-CPU % and run-queue wait % (runnable, no core free), the cores it ran on, their NUMA nodes "
                  "(the GPUs' nodes), median clock. An SGLang scheduler polls and spins on the GPU: near 100 % "
                  "whether or not it is the bottleneck", "",
                  "| workload | server | run (ITL ms) | process | CPU % | main thread % / wait % | cores | NUMA nodes "
                  "(GPUs') | MHz median |", "|---|---|---|---|---|---|---|---|---|"]
        gpu_numa = lambda name: ",".join(str(n) for n in sorted(  # noqa: E731  (None: a host without NUMA nodes)
            {n for n in ((results["servers"].get(name) or {}).get("gpu_numa_node") or {}).values() if n is not None}
        )) or "?"
        lines += [f"| {w} | {name} | {k} ({itl(m)}) | {kind}"
                  f"{' x' + str(c['processes']) if c.get('processes', 1) > 1 else ''} | {c['cpu_pct']} | "
                  f"{dash(c.get('main_pct'))} / {dash(c.get('wait_pct'))} | {c.get('cores')} | "
                  f"{c.get('numa_nodes') or '?'} ({gpu_numa(name)}) | {dash(c.get('mhz_median'))} |"
                  for w, name, k, m, kind, c in cpu]
    if any(r.get("flags_differ") for r in results["compare"]):
        lines += ["", "No ours ÷ in-tree ratios: the two servers in this state ran with different flags "
                  "(`flags` per server in e2e.json)."]
    lines += ["", f"| server | Triton cache | start-up s | decode-graph capture s (target ≤ {CAPTURE_TARGET_S} cold) "
              "| attention backend, page size (as resolved) |", "|---|---|---|---|---|"]
    for name, info in results["servers"].items():
        lines.append(f"| {name} | {info.get('triton_cache')} | {info.get('startup_s', info.get('error', '')[:80])} | "
                     f"{info.get('capture_s')} | {info.get('attention')} |")
    gpus = results.get("tp", 1)
    lines += ["", f"Per GPU ({gpus} GPU{'s' if gpus > 1 else ''}): output tok/s per GPU by workload; weights per rank "
              "(SGLang's log); peak memory.used per GPU (nvidia-smi, launch to stop)", "",
              "| server | " + " | ".join(f"{w} tok/s/GPU" for w in (r["workload"] for r in results["compare"]))
              + " | weights GB per rank | KV pool tokens | peak MiB per GPU |",
              "|---|" + "---|" * (len(results["compare"]) + 3)]
    for name, info in results["servers"].items():
        per_gpu = [info.get("workloads", {}).get(r["workload"]) or {} for r in results["compare"]]
        cells = [f"{m['output_throughput_per_gpu']:.0f}" if "output_throughput_per_gpu" in m else "—" for m in per_gpu]
        lines.append(f"| {name} | {' | '.join(cells)} | {info.get('weights_gb_per_rank')} | "
                     f"{info.get('kv_pool_tokens')} | {info.get('peak_mem_mib_per_gpu')} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "./bench_out"))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "m3_bench_e2e"))
    ap.add_argument("--servers", default="ours,intree")
    ap.add_argument("--workloads", default=None, help=f"comma list of {', '.join(WORKLOADS)} (default: all)")
    ap.add_argument("--smoke", action="store_true", help="CPU harness check: tiny model, tiny load, ours only")
    # Servers may run in separate device calls (each is time-limited) on the same host: results accumulate in
    # the state file; a fresh --work starts afresh.
    ap.add_argument("--state", default=None, help="default: <work>/e2e_state_<layers>l_tp<tp>.json")
    # Full size (issue 12): --layers 60 --dense-layers 3 --tp 8 is the whole model on 8 GPUs; on 2 x H200,
    # --layers 18 --dense-layers 3 --tp 2 (the most that fit: python benchmarks/full_size.py --tp 2).
    ap.add_argument("--layers", type=int, default=4, help="real-dimension layers (default 4; the model has 60)")
    ap.add_argument("--dense-layers", type=int, default=1, help="leading dense layers (default 1; the model has 3)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size, the same for both servers")
    ap.add_argument("--waves", type=int, default=WAVES, help=f"requests per workload / concurrency (default {WAVES})")
    ap.add_argument("--attention-backend", default="triton",
                    help=f"passed to both servers (default triton, sessions 4-15); {SERVER_DEFAULT}: each server's own")
    ap.add_argument("--runs", type=int, default=1,
                    help="fresh server starts per label (default 1); the table shows each workload's median over "
                         "all runs in --state, and each run's ITL")
    ap.add_argument("--extra-flags", default="", help="more server flags for both servers, one shell-quoted string")
    args = ap.parse_args()
    out, work = Path(args.out).resolve(), Path(args.work).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    workloads = SMOKE_WORKLOADS if args.smoke else WORKLOADS
    if args.workloads:
        workloads = {k: workloads[k] for k in args.workloads.split(",")}
    flags = [*(SMOKE_FLAGS if args.smoke else [*gpu_flags(args.attention_backend), "--tp", str(args.tp)]),
             *shlex.split(args.extra_flags)]
    state_path = Path(args.state) if args.state else work / f"e2e_state_{args.layers}l_tp{args.tp}.json"

    names = args.servers.split(",")
    earlier = json.loads(state_path.read_text())["servers"] if state_path.exists() else {}
    mixed = [n for n in names if earlier.get(n, {}).get("flags") not in (None, flags)]
    if mixed:  # one label's workloads are merged across calls: they must share their flags
        ap.error(f"{state_path} holds {mixed} run with other flags ({earlier[mixed[0]]['flags']}); use another --state")
    unknown = [n for n in names if n not in SERVER_ENV]
    if unknown:
        ap.error(f"unknown server label(s) {unknown}; known: {', '.join(SERVER_ENV)}")
    if args.smoke and any(n in SERVER_QUANT for n in names):
        ap.error("--smoke serves the tiny fp32 model on CPU: quantized labels need a GPU")
    def write(path: Path, text: str) -> None:  # whole or not at all: the other lane reads the state meanwhile
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)

    def save(name: str, info: dict, run_id: str) -> dict:
        # Re-read the state just before writing it: another lane of the same host (gpu_round.sh, same --state)
        # may have added its server meanwhile (e.g. ours and the in-tree on the two GPUs at once).
        state = json.loads(state_path.read_text()) if state_path.exists() else {"servers": {}}
        # a previous call's runs stay, and so does a cold start-up (merge_run)
        state["servers"][name] = merge_run(state["servers"].get(name, {}), info, run_id)
        write(state_path, json.dumps(state, indent=1))
        results = {"flags": flags, "waves": args.waves, "layers": args.layers, "dense_layers": args.dense_layers,
                   "tp": args.tp, "servers": state["servers"], "compare": compare(state["servers"], workloads)}
        write(out / "e2e.json", json.dumps(results, indent=1))
        write(out / "e2e.md", markdown(results))
        return results

    def keep_log(name: str) -> None:  # the server's own log beside the results (start-up phases, JIT compiles)
        log = work / f"server_{name}.log"
        if log.exists():
            shutil.copyfile(log, out / log.name)

    def progress(name: str, partial: dict, run_id: str) -> None:
        try:
            save(name, partial, run_id)
            keep_log(name)
        except Exception as e:  # noqa: BLE001 -- a failed interim save must not end the server's run
            print(f"e2e: interim save of {name} failed: {e!r}", file=sys.stderr, flush=True)

    results = None
    for i, name in enumerate(names):
        ckpt = checkpoint(work, args.smoke, args.layers, args.dense_layers, SERVER_QUANT.get(name))
        for r in range(args.runs):  # each run a freshly started server
            run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{name}-{r}"
            info = run_server(name, ckpt, flags, workloads, work, port=30200 + i, gpus=args.tp, waves=args.waves,
                              progress=lambda partial, name=name, run_id=run_id: progress(name, partial, run_id))
            results = save(name, info, run_id)
            keep_log(name)
    print(markdown(results))


if __name__ == "__main__":
    main()
