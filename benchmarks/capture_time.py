#!/usr/bin/env python
"""Where a cold decode-graph capture's time goes (issue 9 §4: ≤ 30 s cold for bs ≤ 64), for our server on the
e2e model (benchmarks/e2e.py: 4-layer real-dimension M3, dummy weights, the e2e flags, --cuda-graph-max-bs 64).

The server starts with fresh Triton, inductor and tvm-ffi caches (a fresh host's state whatever ran on this one
before: SGLang keeps its torch.compile'd helpers and its JIT CUDA kernels per host, benchmarks/cold_start.py) and
benchmarks/compile_listener first on PYTHONPATH, so every Triton compile in its processes is logged (kernel,
seconds; Triton's compilation listener). Reported: start-up and SGLang's "Capture ... decode ... end. elapsed="
seconds, and the compiles inside the capture window (between its begin and end log lines) by kernel -- ours (the
MSA kernels) and SGLang's (fused MoE, dense attention, ...) -- with their summed compile seconds, so the capture
time splits into compiling and the rest (inductor's and nvcc's work, outside Triton's listener, is not in that
sum). What no listener sees, a sampler does: the main thread's Python stack every 0.5 s (compile_listener's
M3_STACK_LOG), summed by innermost frame inside the capture window. With --warm the server is started again on the
same caches: the warm capture time is the capture without compiles.

    python benchmarks/capture_time.py --out $OUT [--warm]      # GPU; capture_time.json / .md, server_*.log in --out
    python benchmarks/capture_time.py --smoke --out /tmp/ct    # CPU harness check (no capture, no Triton there)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "benchmarks"))

from servers import Server  # noqa: E402

import e2e  # noqa: E402

LISTENER = REPO / "benchmarks" / "compile_listener"
OURS = {"_meta_kernel", "_store_index_k_kernel", "_store_kv_index_kernel", "_indexer_kernel", "_indexer_merge_kernel",
        "_indexer_select_kernel", "_sparse_attn_kernel", "_sparse_attn_merge_kernel"}


def capture_window(log: str) -> tuple[float, float] | None:
    """Epoch seconds of the target decode capture's begin and end log lines ("[YYYY-mm-dd HH:MM:SS ...] Capture
    target decode ... begin/end"; one-second resolution)."""
    stamps = {}
    for when in ("begin", "end"):
        found = re.findall(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[^\]]*\] Capture [^\n]*?decode[^\n]*? " + when, log)
        if not found:
            return None
        stamps[when] = dt.datetime.strptime(found[-1], "%Y-%m-%d %H:%M:%S").timestamp()
    return stamps["begin"], stamps["end"] + 1.0


def compile_summary(lines: list[dict], window: tuple[float, float] | None) -> dict:
    """Compiles (cache misses) by kernel: all, and those inside the capture window."""
    out = {"all": defaultdict(lambda: [0, 0.0]), "in_capture": defaultdict(lambda: [0, 0.0])}
    for c in lines:
        if c["cache_hit"]:
            continue
        for part in ("all", "in_capture") if window and window[0] <= c["t"] <= window[1] else ("all",):
            out[part][c["name"]][0] += 1
            out[part][c["name"]][1] += c["s"]
    res = {}
    for part, by_name in out.items():
        ours = {k: v for k, v in by_name.items() if k in OURS}
        res[part] = {"by_kernel": {k: {"compiles": n, "s": round(s, 2)} for k, (n, s) in
                                   sorted(by_name.items(), key=lambda kv: -kv[1][1])},
                     "compiles": sum(n for n, _ in by_name.values()),
                     "compile_s": round(sum(s for _, s in by_name.values()), 2),
                     "ours_compiles": sum(n for n, _ in ours.values()),
                     "ours_compile_s": round(sum(s for _, s in ours.values()), 2)}
    return res


def frame_site(frame: str) -> str:
    """"path:line function" -> "path-from-the-package function" (site-packages and line number dropped)."""
    path, _, func = frame.partition(" ")
    path = re.split(r"(?:site-packages|dist-packages|/lib/python3\.\d+)/", path.rsplit(":", 1)[0])[-1]
    return f"{path} {func}"


def stack_summary(samples: list[dict], window: tuple[float, float] | None, interval: float, top: int = 15) -> dict:
    """Main-thread stack samples inside the capture window, for the process that captures (every process of the
    server samples at the same rate: the one whose stacks pass through a function named *capture* most often, the
    scheduler; else the one with the most samples): seconds by innermost frame and by the innermost frame of
    SGLang, torch, Triton, tvm-ffi or flashinfer, the largest first. Each sample is credited with the wall time since
    that process's previous sample (at most 4 intervals): the sampler needs the GIL, so a stretch of C code holding
    it shows up as one late sample that stood for the whole stretch."""
    inside = [s for s in samples if window and window[0] <= s["t"] <= window[1] and s["stack"]]
    if not inside:
        return {"samples": 0}
    pids, capturing = defaultdict(int), defaultdict(int)
    for s in inside:
        pids[s["pid"]] += 1
        capturing[s["pid"]] += any("capture" in f.rsplit(" ", 1)[-1].lower() for f in s["stack"])
    pid = max(pids, key=lambda p: (capturing[p], pids[p]))
    by_leaf, by_owner = defaultdict(float), defaultdict(float)
    previous = None
    for s in sorted((s for s in inside if s["pid"] == pid), key=lambda s: s["t"]):
        credit = interval if previous is None else min(s["t"] - previous, 4 * interval)
        previous = s["t"]
        by_leaf[frame_site(s["stack"][0])] += credit
        owner = next((f for f in map(frame_site, s["stack"]) if f.startswith(("sglang", "torch", "triton",
                                                                             "tvm_ffi", "flashinfer"))), "other")
        by_owner[owner] += credit

    def seconds(totals):
        return {k: round(v, 1) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])[:top]}

    return {"samples": pids[pid], "pid": pid, "interval_s": interval, "by_innermost_frame_s": seconds(by_leaf),
            "by_innermost_library_frame_s": seconds(by_owner)}


STACK_INTERVAL = 0.5


def read_jsonl(path: Path) -> list[dict]:
    """The JSON lines of a measurement log, skipping a torn one (a process killed mid-write)."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def start(name: str, ckpt: Path, work: Path, cache: str, port: int, flags: list[str]) -> dict:
    compile_log, stack_log = work / f"compiles_{name}.jsonl", work / f"stacks_{name}.jsonl"
    compile_log.unlink(missing_ok=True)
    stack_log.unlink(missing_ok=True)
    env = {"TRITON_CACHE_DIR": f"{cache}/triton", "TORCHINDUCTOR_CACHE_DIR": f"{cache}/inductor",
           "TVM_FFI_CACHE_DIR": f"{cache}/tvm-ffi",
           "M3_COMPILE_LOG": str(compile_log), "M3_STACK_LOG": str(stack_log), "M3_STACK_INTERVAL": str(STACK_INTERVAL),
           "PYTHONPATH": os.pathsep.join([str(LISTENER), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    server = Server(name, ckpt, flags, log_dir=work, port=port, env=env)
    try:
        server.wait(timeout=900)
        log = server.log()
    finally:
        server.stop()
    lines = read_jsonl(compile_log)
    samples = read_jsonl(stack_log)
    window = capture_window(log)
    return {"startup_s": round(server.startup_s, 1), "capture_s": e2e.capture_seconds(log),
            "capture_window_found": window is not None, "compile_log_lines": len(lines),
            "compiles": compile_summary(lines, window), "stacks": stack_summary(samples, window, STACK_INTERVAL)}


def markdown(res: dict) -> str:
    out = ["| start | start-up s | capture s | compiles in capture (ours) | their compile s (ours) |",
           "|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        c = r["compiles"]["in_capture"]
        out.append(f"| {name} | {r['startup_s']} | {r['capture_s']} | {c['compiles']} ({c['ours_compiles']}) | "
                   f"{c['compile_s']} ({c['ours_compile_s']}) |")
    cold = res["runs"]["cold"]["compiles"]["in_capture"]["by_kernel"]
    out += ["", "Cold capture, compiles by kernel:", "", "| kernel | compiles | s |", "|---|---|---|"]
    out += [f"| {k} | {v['compiles']} | {v['s']} |" for k, v in cold.items()]
    stacks = res["runs"]["cold"].get("stacks", {})
    for part, title in (("by_innermost_library_frame_s", "innermost SGLang / torch / Triton / tvm-ffi frame"),
                        ("by_innermost_frame_s", "innermost frame")):
        if stacks.get(part):
            out += ["", f"Cold capture, main-thread stack samples (every {stacks['interval_s']} s) by {title}:", "",
                    "| frame | s |", "|---|---|"] + [f"| {k} | {v} |" for k, v in stacks[part].items()]
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "./capture_out")))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "m3_capture_time")
    ap.add_argument("--warm", action="store_true", help="start a second time on the same caches")
    ap.add_argument("--smoke", action="store_true", help="CPU harness check: the tiny model, e2e's CPU flags")
    ap.add_argument("--attention-backend", default="triton",
                    help=f"as e2e.py's ({e2e.SERVER_DEFAULT}: the server's own)")
    ap.add_argument("--budget-s", type=float, default=240,
                    help="skip the warm start when the cold one's start-up would not fit in what is left")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = e2e.checkpoint(args.work, smoke=args.smoke)
    flags = e2e.SMOKE_FLAGS if args.smoke else e2e.gpu_flags(args.attention_backend)
    cache = tempfile.mkdtemp(prefix="capture_caches_")  # Triton's, inductor's, tvm-ffi's: cold whatever ran here
    res = {"flags": flags, "checkpoint": ckpt.name, "runs": {}}
    t0 = time.time()
    for name in ("cold", "warm") if args.warm else ("cold",):
        if name == "warm" and time.time() - t0 + res["runs"]["cold"]["startup_s"] > args.budget_s:
            res["runs"]["warm"] = {"error": f"skipped: would not fit in --budget-s {args.budget_s}"}
            break
        try:
            res["runs"][name] = start(name, ckpt, args.work, cache, port=30400, flags=flags)
        except Exception as e:  # noqa: BLE001 -- keep what the cold start measured
            res["runs"][name] = {"error": repr(e)[-2000:]}
        log = args.work / f"server_{name}.log"  # brought back: its last 400K characters
        if log.exists():
            (args.out / f"server_{name}.log").write_text(log.read_text(errors="replace")[-400_000:])
        (args.out / "capture_time.json").write_text(json.dumps(res, indent=1) + "\n")
        if "error" in res["runs"][name]:
            break
    (args.out / "capture_time.json").write_text(json.dumps(res, indent=1) + "\n")
    ok = {k: v for k, v in res["runs"].items() if "error" not in v}
    if "cold" in ok:
        (args.out / "capture_time.md").write_text(markdown({"runs": ok}))
        print(markdown({"runs": ok}))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "compiles"} for k, v in res["runs"].items()}))


if __name__ == "__main__":
    main()
