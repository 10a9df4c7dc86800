"""Where a decode step's GPU time goes (issue 9 §2: "profile a decode step first"), ours and the in-tree M3.

One server at a time on the real-dimension truncated model of `e2e.py` (dummy weights, the same flags), one request
of `--ctx` random token ids decoding at concurrency 1 (graph replay at batch 1). While it decodes, SGLang's
`/start_profile` records `--steps` decode steps with the torch profiler (GPU activity only); the kernels of the
trace are summed by name and divided by the number of steps: µs per decode step per kernel, largest first.

    python benchmarks/profile_decode.py --out $OUT --servers ours,intree --ctx 32768

Writes profile_decode.json (per server: the step's kernel time table, its total, the kernel count) and
profile_decode.md under --out; the raw traces stay under --work.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))

from e2e import GPU_FLAGS, SERVER_ENV, checkpoint, triton_cache  # noqa: E402
from servers import Server, post  # noqa: E402


def kernel_table(trace_dir: Path, steps: int) -> dict:
    """Sum the GPU kernels of every trace under `trace_dir` by name: {name: µs per step}, largest first."""
    per_name, calls, count, files = defaultdict(float), defaultdict(int), 0, []
    for path in sorted(trace_dir.rglob("*.json*")):
        files.append(path.name)
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            trace = json.load(f)
        for ev in trace.get("traceEvents", []):
            if ev.get("cat") == "kernel" and ev.get("ph") == "X":
                per_name[ev["name"]] += float(ev.get("dur", 0.0))
                calls[ev["name"]] += 1
                count += 1
    table = {k: round(v / steps, 2) for k, v in sorted(per_name.items(), key=lambda kv: -kv[1])}
    # The trace files read and the launch count of the largest kernels: a check of the division by `steps` (the
    # lm_head GEMM runs once per step, so its count is the number of steps the traces hold).
    top = list(table)[:8]
    return {"us_per_step": table, "total_us_per_step": round(sum(per_name.values()) / steps, 1),
            "kernels_per_step": round(count / steps, 1), "trace_files": files,
            "launches_of_largest": {k: calls[k] for k in top}}


def profile(name: str, ckpt: Path, ctx: int, steps: int, work: Path) -> dict:
    # e2e.py's per-label Triton cache when --work is e2e's: after an e2e run on the same host the start is warm.
    env = {**SERVER_ENV[name], "TRITON_CACHE_DIR": str(triton_cache(work, name))}
    flags = list(GPU_FLAGS)  # capture bs <= 8 only: a faster start; batch 1 is what is profiled
    flags[flags.index("--cuda-graph-max-bs") + 1] = "8"
    server = Server(name, ckpt, flags, log_dir=work, port=31500, env=env)
    trace_dir = work / f"trace_{name}"
    try:
        server.wait(timeout=900)
        # A warm-up request of the same length first (other ids: no radix hit), so the profiled request's prefill
        # does not JIT-compile Triton kernels (cold cache) into the profiling window.
        warm = [(i * 104729) % 150000 + 100 for i in range(ctx)]
        post(server.url + "/generate", {"input_ids": warm, "sampling_params": {"max_new_tokens": 8, "ignore_eos": True}})
        ids = [(i * 7919) % 150000 + 100 for i in range(ctx)]
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1500, "temperature": 0, "ignore_eos": True}}
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("r", post(server.url + "/generate", body, timeout=900)))
        t.start()
        time.sleep(float(os.environ.get("PROFILE_DELAY_S", "3")))  # prefill done, decode running in the graph
        post(server.url + "/start_profile", {"output_dir": str(trace_dir), "num_steps": steps, "activities": ["GPU"]})
        t.join()
        time.sleep(5)  # the trace is written after the last profiled step
        out = kernel_table(trace_dir, steps)
        out["completion_tokens"] = done.get("r", {}).get("meta_info", {}).get("completion_tokens")
        return out
    except Exception as e:  # noqa: BLE001 -- one server's failure must not hide the other's table
        return {"error": repr(e)[:2000], "log_tail": server.log()[-3000:]}
    finally:
        server.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "./profile_out"))
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "m3_profile"))
    ap.add_argument("--servers", default="ours,intree")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(work, smoke=False)
    results = {"ctx": args.ctx, "steps": args.steps, "servers": {}}
    for name in args.servers.split(","):
        results["servers"][name] = profile(name, ckpt, args.ctx, args.steps, work)
        (out / "profile_decode.json").write_text(json.dumps(results, indent=1))
    lines = [f"# Decode step at batch 1, {args.ctx} context, µs per step (GPU kernels, {args.steps} steps)", ""]
    for name, r in results["servers"].items():
        lines.append(f"## {name}: total {r.get('total_us_per_step')} µs, {r.get('kernels_per_step')} kernels/step")
        for k, v in list(r.get("us_per_step", {}).items())[:30]:
            lines.append(f"- {v:8.2f}  {k[:150]}")
        lines.append("")
    (out / "profile_decode.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
