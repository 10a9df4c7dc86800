"""Where a decode step's GPU time goes (issue 9 §2: "profile a decode step first"), ours and the in-tree M3.

One server at a time on the real-dimension truncated model of `e2e.py` (dummy weights, the same flags), one request
of `--ctx` random token ids decoding at concurrency 1 (graph replay at batch 1). While it decodes, SGLang's
`/start_profile` records `--steps` decode steps with the torch profiler (GPU activity only); the kernels of the
trace are summed by name and divided by the number of steps: µs per decode step per kernel, largest first; beside
them the GPU timeline per step and its idle part (kernel time below the timeline: the GPU waited on the host).

    python benchmarks/profile_decode.py --out $OUT --servers ours,intree --ctx 32768 [--phases prefill,decode] [--starts N]

With --phases prefill too, the same server first profiles the prefill of --prompts fresh --ctx-token prompts sent
as one batch (every chunk; µs per batch by kernel: where TTFT goes). `--ctx 2048 --prompts 8` is the prefill of
e2e.py's 2K workload (64 such prompts arrive at once; chunked prefill packs them into batches of its chunk size,
8192 tokens on an H200 at these flags: 4 prompts, so 8 prompts are two batches).

Writes profile_decode.json (per server and phase: the kernel time table, its total, the kernel count) and
profile_decode.md under --out; the raw traces of each server's last start stay under --work.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))

from e2e import SERVER_DEFAULT, SERVER_ENV, checkpoint, gpu_flags, triton_cache  # noqa: E402
from servers import Server, post  # noqa: E402


GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # the torch profiler's device-activity categories


def kernel_table(trace_dir: Path, steps: int, pattern: str = "*.json*") -> dict:
    """Sum the GPU kernels of every trace under `trace_dir` (named like `pattern`) by name: {name: µs per step},
    largest first."""
    per_name, calls, count, files, spans = defaultdict(float), defaultdict(int), 0, [], []
    for path in sorted(trace_dir.rglob(pattern)):
        files.append(path.name)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            trace = json.load(f)
        for ev in trace.get("traceEvents", []):
            if ev.get("ph") != "X" or ev.get("cat") not in GPU_WORK:
                continue
            spans.append((float(ev["ts"]), float(ev["ts"]) + float(ev.get("dur", 0.0))))
            if ev["cat"] == "kernel":
                per_name[ev["name"]] += float(ev.get("dur", 0.0))
                calls[ev["name"]] += 1
                count += 1
    table = {k: round(v / steps, 2) for k, v in sorted(per_name.items(), key=lambda kv: -kv[1])}
    # The trace files read and the launch count of the largest kernels: a check of the division by `steps` (the
    # lm_head GEMM runs once per step, so its count is the number of steps the traces hold).
    top = list(table)[:8]
    return {"us_per_step": table, "total_us_per_step": round(sum(per_name.values()) / steps, 1),
            "kernels_per_step": round(count / steps, 1), "trace_files": files,
            "launches_of_largest": {k: calls[k] for k in top}, **timeline(spans, steps)}


def timeline(spans: list[tuple[float, float]], steps: int) -> dict:
    """Where the GPU was idle: over the traces' device intervals (start, end) in µs (kernels, copies, memsets), the
    time from the first one's start to the last one's end and the part of it in which none ran (overlapping work of
    several streams counts once), per step (averaged: not each step's own), and the longest idle gap. Idle time is
    the GPU waiting on the host, the profiler's own host work included; a kernel total that grows means slower
    kernels. One GPU's traces (TP 1): with several ranks' files the union would hide one rank's idle time."""
    if not spans:
        return {"span_us_per_step": None, "idle_us_per_step": None, "longest_idle_us": None}
    spans = sorted(spans)
    idle, longest, reach = 0.0, 0.0, spans[0][1]
    for start, end in spans[1:]:
        if start > reach:
            idle += start - reach
            longest = max(longest, start - reach)
        reach = max(reach, end)
    return {"span_us_per_step": round((reach - spans[0][0]) / steps, 1), "idle_us_per_step": round(idle / steps, 1),
            "longest_idle_us": round(longest, 1)}


DECODE_TOKENS = 4000  # the profiled decode request's output length (see profile_decode)


def _ids(ctx: int, seed: int) -> list[int]:
    # distinct id streams per seed: no radix hit between the warm-up and the profiled requests
    return [((i + 1) * seed) % 150000 + 100 for i in range(ctx)]  # (i + 1): no shared first id either


def _await_trace(trace_dir: Path, pattern: str, timeout_s: float = 60.0) -> None:
    """Wait until the profiler has written its trace: files named like `pattern` under trace_dir whose sizes stay the
    same for a second (the trace is exported after the profiled steps, and a half-written .gz does not read)."""
    sizes, t_end = None, time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        now = {p: p.stat().st_size for p in trace_dir.rglob(pattern)} if trace_dir.exists() else {}
        if now and now == sizes:
            return
        sizes = now
        time.sleep(1)


def profile_prefill(server: Server, ctx: int, trace_dir: Path, prompts: int = 1) -> dict:
    """GPU kernels of the prefill of `prompts` fresh `ctx`-token prompts sent as one batched /generate (all their
    chunks): µs per batch, by kernel. SGLang's by-stage profiler records the next `chunks` prefill batches (chunks =
    prompts * ctx / the server's chunked_prefill_size, rounded up) into a trace of their own
    (*-EXTEND.trace.json.gz), closed when the first decode batch comes; nothing else runs."""
    info = post(server.url + "/server_info", None)
    chunk = int(info.get("chunked_prefill_size") or 0)
    chunks = -(-(ctx * prompts) // chunk) if chunk > 0 else 1
    post(server.url + "/start_profile", {"output_dir": str(trace_dir), "num_steps": chunks, "activities": ["GPU"],
                                         "profile_by_stage": True})
    t0 = time.perf_counter()
    # chunks + 3 tokens: enough decode steps after the prefill for the by-stage profiler to close both its traces
    ids = [_ids(ctx, 6007 + 2 * i) for i in range(prompts)]
    post(server.url + "/generate", {"input_ids": ids if prompts > 1 else ids[0],
                                    "sampling_params": {"max_new_tokens": chunks + 3, "ignore_eos": True}}, timeout=900)
    wall = time.perf_counter() - t0
    _await_trace(trace_dir, "*EXTEND.trace.json*")
    out = kernel_table(trace_dir, 1, "*EXTEND.trace.json*")
    out.update(chunked_prefill_size=chunk, chunks=chunks, prompts=prompts, request_wall_ms=round(wall * 1e3, 1))
    return out


def profile_decode(server: Server, ctx: int, steps: int, trace_dir: Path) -> dict:
    """GPU kernels of `steps` decode steps at batch 1 after a `ctx`-token prompt: µs per step, by kernel."""
    # DECODE_TOKENS: the request must outlast PROFILE_DELAY_S plus the profiled steps (1500 at 1.7 ms per step did not,
    # once the prefill got faster: session 8, an empty decode trace)
    body = {"input_ids": _ids(ctx, 7919),
            "sampling_params": {"max_new_tokens": DECODE_TOKENS, "temperature": 0, "ignore_eos": True}}
    done = {}

    def request():
        try:
            done["r"] = post(server.url + "/generate", body, timeout=900)
        except Exception as e:  # noqa: BLE001 -- re-raised below: a failed request is no profile (session 19's
            done["error"] = e   # 400 came back as a table of 0 kernels)

    t = threading.Thread(target=request)
    t.start()
    time.sleep(float(os.environ.get("PROFILE_DELAY_S", "3")))  # prefill done, decode running in the graph
    post(server.url + "/start_profile", {"output_dir": str(trace_dir), "num_steps": steps, "activities": ["GPU"]})
    t.join()
    if "error" in done:
        raise RuntimeError(f"the profiled decode request failed: {done['error']}") from done["error"]
    _await_trace(trace_dir, "*.json*")
    out = kernel_table(trace_dir, steps)
    out["completion_tokens"] = done.get("r", {}).get("meta_info", {}).get("completion_tokens")
    try:  # a failure here must not lose the profile above
        out["unprofiled"] = decode_rates(server, body["input_ids"])
    except Exception as e:  # noqa: BLE001
        out["unprofiled"] = {"error": repr(e)[:500]}
    return out


UNPROFILED_TOKENS = (1, 256, 1792)  # 1: the fixed cost; 256 and 1792: e2e.py's 128k-c1 and 128k-c1-decode outputs


def decode_rates(server: Server, ids: list[int], lengths=UNPROFILED_TOKENS) -> dict:
    """This server start's decode step time with the profiler off (the profiler's own host work lengthens the
    profiled timeline). Requests of `lengths` output tokens on `ids`, a prompt the radix cache holds (the profiled
    request's: what is left to prefill is one token at page size 1, up to a page at 128), one after the other; from
    their wall times (`requests`: each one's tokens, cached tokens, wall ms and the server's own e2e_latency ms) the
    ms per step between consecutive lengths, `ms_per_step` {"1-256": ..., "256-1792": ...}: the differences cancel
    what every request pays once (the prompt's JSON, the radix match, the short prefill, HTTP)."""
    reqs = []
    for n in lengths:
        t0 = time.perf_counter()
        r = post(server.url + "/generate", {"input_ids": ids, "sampling_params": {
            "max_new_tokens": n, "temperature": 0, "ignore_eos": True}}, timeout=900)
        wall_ms = (time.perf_counter() - t0) * 1e3
        meta = r.get("meta_info", {})
        latency = meta.get("e2e_latency")
        reqs.append({"tokens": meta.get("completion_tokens"), "cached_tokens": meta.get("cached_tokens"),
                     "prompt_tokens": meta.get("prompt_tokens"), "wall_ms": round(wall_ms, 2),
                     "server_e2e_latency_ms": None if latency is None else round(latency * 1e3, 2)})
    steps = {f"{a['tokens']}-{b['tokens']}": round((b["wall_ms"] - a["wall_ms"]) / (b["tokens"] - a["tokens"]), 4)
             for a, b in zip(reqs, reqs[1:]) if a["tokens"] and b["tokens"] and b["tokens"] > a["tokens"]}
    return {"requests": reqs, "ms_per_step": steps}


def profile(name: str, ckpt: Path, ctx: int, steps: int, work: Path, phases: list[str], prompts: int = 1,
            attention_backend: str = "triton") -> dict:
    # e2e.py's per-label Triton cache when --work is e2e's: after an e2e run on the same host the start is warm.
    env = {**SERVER_ENV[name], "TRITON_CACHE_DIR": str(triton_cache(work, name))}
    flags = gpu_flags(attention_backend)  # capture bs <= 8 only: a faster start; batch 1 is what is profiled
    flags[flags.index("--cuda-graph-max-bs") + 1] = "8"
    # the decode request is ctx + DECODE_TOKENS long: at ctx 131072 e2e's 133120 refused it (session 19, a 400)
    at = flags.index("--context-length") + 1
    flags[at] = str(max(int(flags[at]), ctx + DECODE_TOKENS + 8))
    server = Server(name, ckpt, flags, log_dir=work, port=31500, env=env)
    results = {}
    try:
        server.wait(timeout=900)
        # A warm-up request of the same length first (other ids: no radix hit), so the profiled requests' prefill
        # does not JIT-compile Triton kernels (cold cache) into the profiling window.
        post(server.url + "/generate", {"input_ids": [_ids(ctx, 104729 + 2 * i) for i in range(prompts)],
                                         "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}}, timeout=900)
        for phase in phases:
            trace_dir = work / f"trace_{name}_{phase}"
            shutil.rmtree(trace_dir, ignore_errors=True)  # kernel_table sums every trace there: none from a past run
            results[phase] = (profile_prefill(server, ctx, trace_dir, prompts) if phase == "prefill"
                              else profile_decode(server, ctx, steps, trace_dir))
        return results
    except Exception as e:  # noqa: BLE001 -- one server's failure must not hide the other's table
        return {**results, "error": repr(e)[:2000], "log_tail": server.log()[-3000:]}
    finally:
        server.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "./profile_out"))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "m3_profile"))
    ap.add_argument("--servers", default="ours,intree")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=1, help="prefill phase: prompts of --ctx tokens in one batch")
    ap.add_argument("--phases", default="decode", help="comma list of prefill, decode (one server start for all)")
    ap.add_argument("--starts", type=int, default=1, help="fresh starts of each server (labels NAME#1, NAME#2, ...)")
    ap.add_argument("--attention-backend", default="triton", help=f"as e2e.py's ({SERVER_DEFAULT}: each server's own)")
    args = ap.parse_args()
    phases = args.phases.split(",")
    if not set(phases) <= {"prefill", "decode"}:
        ap.error(f"--phases takes prefill and/or decode, got {args.phases!r}")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(work, smoke=False)
    results = {"ctx": args.ctx, "steps": args.steps, "prompts": args.prompts,
               "attention_backend": args.attention_backend, "servers": {}}
    for name in args.servers.split(","):
        for start in range(args.starts):  # fresh starts: a server's decode speed can differ per start (session 20)
            label = name if args.starts == 1 else f"{name}#{start + 1}"
            results["servers"][label] = profile(name, ckpt, args.ctx, args.steps, work, phases, args.prompts,
                                                args.attention_backend)
            (out / "profile_decode.json").write_text(json.dumps(results, indent=1))
    title = {"decode": f"Decode step at batch 1, {args.ctx} context, µs per step (GPU kernels, {args.steps} steps)",
             "prefill": f"Prefill of {args.prompts} x {args.ctx}-token prompt(s) in one batch, µs per batch (GPU "
                        f"kernels, every chunk)"}
    lines = []
    for phase in phases:
        lines += [f"# {title[phase]}", ""]
        for name, res in results["servers"].items():
            r = res.get(phase, {})
            extra = f", request {r['request_wall_ms']} ms wall" if "request_wall_ms" in r else ""
            if r.get("span_us_per_step") is not None:
                extra += (f"; GPU timeline {r['span_us_per_step']} µs per step, {r['idle_us_per_step']} of it idle "
                          f"(longest gap {r['longest_idle_us']} µs)")
            unprofiled = r.get("unprofiled", {})
            if unprofiled.get("ms_per_step"):
                cached = ", ".join(f"{u['cached_tokens']}" for u in unprofiled["requests"])
                extra += (f"; unprofiled ms per step {unprofiled['ms_per_step']} (prompt tokens cached: {cached} of "
                          f"{unprofiled['requests'][0]['prompt_tokens']})")
            elif "error" in unprofiled:
                extra += f"; unprofiled rates failed: {unprofiled['error'][:200]}"
            lines.append(f"## {name}: total {r.get('total_us_per_step')} µs, {r.get('kernels_per_step')} kernels"
                         f"{extra}{' -- error: ' + res['error'][:200] if 'error' in res else ''}")
            for k, v in list(r.get("us_per_step", {}).items())[:30]:
                lines.append(f"- {v:10.2f}  {k[:150]}")
            lines.append("")
    (out / "profile_decode.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
