#!/usr/bin/env python
"""What SGLang's torch.compile'd fused-MoE helpers cost M3 on a cold host, and what replaces them (issue 9 §4).

SGLang's Triton fused-MoE runs two helpers through torch.compile on M3's decode path: the non-interleaved clamped
SwiGLU (`swiglu_no_interleaved_with_alpha_and_limit`, every token count) and the expert sum-reduce
(`moe_sum_reduce_torch_compile`, <= 32 tokens). Their inductor compiles happen at first use, i.e. inside the
decode-graph capture, and are cached per host (TORCHINDUCTOR_CACHE_DIR), not per server: a second server on the same
host starts warm. While M3 is served, plugin.py runs our Triton `swigluoai_triton` and sgl_kernel's CUDA
`moe_sum_reduce` instead. This script measures, in one fresh process with fresh inductor and Triton caches (as on a
fresh host):

- first call (wall s, synchronized) of each helper at the decode capture's token counts, largest first as SGLang
  captures (the compiled helpers recompile once for a dynamic shape; the very first includes inductor's start-up);
- steady state: median us per call from CUDA-graph replays (20 calls per graph) at 1, 8 and 32 tokens.

Shapes: M3 at TP1/TP8 (I = 3072 / TP per expert, hidden 6144, top-k 4), bf16.

    python benchmarks/moe_helpers.py --out $OUT        # GPU; moe_helpers.json / .md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, TOPK, ALPHA, LIMIT = 6144, 4, 1.702, 7.0  # M3_SPEC §1.1
CAPTURE_TOKENS = (64, 48, 32, 16, 8, 4, 2, 1)  # a subset of bs <= 64, in SGLang's capture order (largest first)
TIMED_TOKENS = (1, 8, 32)
GRAPH_CALLS, REPLAYS = 20, 20


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "./moe_helpers_out")))
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    fresh = tempfile.mkdtemp(prefix="moe_helpers_")  # before torch is imported: both caches cold
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = f"{fresh}/inductor"
    os.environ["TRITON_CACHE_DIR"] = f"{fresh}/triton"

    import torch
    from sgl_kernel import moe_sum_reduce
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from sglang_m3.layers.swiglu_triton import swigluoai_triton

    inter = 3072 // args.tp
    helpers = {  # name -> (function of the token count, whether SGLang runs it at that count)
        "sglang_swiglu_compiled": (lambda gu, _o: fused_moe.swiglu_no_interleaved_with_alpha_and_limit(gu, ALPHA, LIMIT),
                                   lambda t: True),
        "ours_swigluoai_triton": (lambda gu, _o: swigluoai_triton(gu, ALPHA, LIMIT), lambda t: True),
        "sglang_sum_reduce_compiled": (lambda _g, o: fused_moe.moe_sum_reduce_torch_compile(o[0], o[1], 1.0),
                                       lambda t: t <= 32),
        "sgl_kernel_moe_sum_reduce": (lambda _g, o: moe_sum_reduce(o[0], o[1], 1.0), lambda t: t <= 32),
    }

    def inputs(t: int):
        g = torch.Generator(device="cuda").manual_seed(t)
        gate_up = torch.randn(t * TOPK, 2 * inter, device="cuda", dtype=torch.bfloat16, generator=g) * 4
        per_expert = torch.randn(t, TOPK, HIDDEN, device="cuda", dtype=torch.bfloat16, generator=g)
        return gate_up, (per_expert, torch.empty(t, HIDDEN, device="cuda", dtype=torch.bfloat16))

    res = {"tp": args.tp, "intermediate": inter, "hidden": HIDDEN, "topk": TOPK, "device": torch.cuda.get_device_name(),
           "first_call_s": {}, "steady_us": {}}
    torch.cuda.synchronize()
    for name, (fn, used) in helpers.items():
        firsts = {}
        for t in CAPTURE_TOKENS:
            if not used(t):
                continue
            gu, o = inputs(t)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn(gu, o)
            torch.cuda.synchronize()
            firsts[t] = round(time.perf_counter() - t0, 3)
        res["first_call_s"][name] = {"by_tokens": firsts, "sum": round(sum(firsts.values()), 2)}
    for name, (fn, used) in helpers.items():
        steady = {}
        for t in TIMED_TOKENS:
            if not used(t):
                continue
            gu, o = inputs(t)
            for _ in range(3):
                fn(gu, o)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(GRAPH_CALLS):
                    fn(gu, o)
            times = []
            for _ in range(REPLAYS):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1000 / GRAPH_CALLS)
            steady[t] = round(statistics.median(times), 2)
        res["steady_us"][name] = steady
    # the replacements compute what SGLang's helpers compute (fp32 math in both; bf16 outputs within one ulp)
    gu, o = inputs(8)
    a, b = fused_moe.swiglu_no_interleaved_with_alpha_and_limit(gu, ALPHA, LIMIT), swigluoai_triton(gu, ALPHA, LIMIT)
    res["swiglu_max_rel_diff"] = float(((a.float() - b.float()).abs() / (b.float().abs() + 1e-3)).max())
    fused_moe.moe_sum_reduce_torch_compile(o[0], o[1], 1.0)
    ref = o[1].clone()
    moe_sum_reduce(o[0], o[1], 1.0)
    res["sum_reduce_max_abs_diff"] = float((ref.float() - o[1].float()).abs().max())

    (args.out / "moe_helpers.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"{res['device']}, TP{args.tp} (I = {inter}), bf16; fresh inductor + Triton caches", "",
             "| helper | first calls, sum s | first call at the largest count s | us at 1 / 8 / 32 tokens |",
             "|---|---|---|---|"]
    for name in helpers:
        f, s = res["first_call_s"][name], res["steady_us"][name]
        lines.append(f"| {name} | {f['sum']} | {next(iter(f['by_tokens'].values()))} | "
                     f"{' / '.join(str(s.get(t, '-')) for t in TIMED_TOKENS)} |")
    (args.out / "moe_helpers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
