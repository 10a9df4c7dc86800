#!/usr/bin/env python
"""Tune SGLang's fused-MoE Triton kernel configs for MiniMax-M3's routed-expert shapes (issue 9 §3), on one GPU.

Shapes (M3_SPEC §1.1): E = 128 experts, hidden K = 6144, expert width 3072 split over TP ranks, top-4, bf16, the
clamped SwiGLU as M3MoE runs it (activation "silu", gemm1_alpha 1.702, gemm1_clamp_limit 7.0, gate/up not
interleaved). Per TP size: w13 [E, 2 * 3072 / TP, 6144], w2 [E, 6144, 3072 / TP]. SGLang names a config file by
E and N = w2.shape[2] = 3072 / TP (``get_config_file_name``: ``E=128,N=<N>,device_name=<GPU>.json``) and looks it
up under ``configs/triton_<version>/`` (``get_moe_configs``); the file maps a token count M to one config, the
nearest M wins.

Method (our own loop over SGLang's installed kernel, not SGLang's tuning script): for each TP size and each M of
``--m``, every candidate config of a bounded space (block M chosen by M, block N/K, group M, warps, stages) runs
``fused_experts`` under ``override_config`` -- the same call the Triton MoE runner makes -- on random weights and a
random top-4 routing; the median of ``--iters`` CUDA-event times after ``--warmup`` calls is kept, and the fastest
config is written. The config SGLang picks today without our files (its bundled file for that name if any, else
``get_default_config``) is timed the same way and recorded with the gain. A wall-clock ``--budget-s`` bounds the
run: shapes and M values not reached are reported as such, and what was tuned is written.

Outputs under --out: ``configs/triton_<ver>/E=128,N=<N>,device_name=<GPU>.json`` (SGLang's format, tuned M values
only) and ``tune_moe.json`` (per shape and M: best config and µs, SGLang's current config and µs, the gain).

    python benchmarks/tune_moe.py --out $OUT                   # GPU (scripts/gpu_tune_moe.sh)
    python benchmarks/tune_moe.py --dry-run                    # any machine: the search space and file names
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

E, HIDDEN, INTER, TOPK = 128, 6144, 3072, 4
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0
GRAPH_CALLS = 10  # fused_experts calls per timed CUDA-graph replay
DEFAULT_M = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


def candidates(m: int) -> list[dict]:
    """Bounded search space for bf16 on Hopper (~20 configs per M, ~50 distinct overall, so that compiling them
    fits the budget): block M by token count (each expert sees ~M * topk / E rows), block N/K, warps; 3 stages;
    group M 1 for small M (few row blocks), 16 otherwise."""
    block_m = [16, 32] if m <= 64 else [32, 64] if m <= 512 else [64, 128]
    out = []
    for bm, bn, bk, warps in itertools.product(block_m, [64, 128, 256], [64, 128], [4, 8]):
        if bm * bn >= 128 * 256 and warps == 4:  # large tiles need 8 warps
            continue
        if bm <= 32 and bn == 256 and warps == 8:
            continue
        out.append(dict(BLOCK_SIZE_M=bm, BLOCK_SIZE_N=bn, BLOCK_SIZE_K=bk, GROUP_SIZE_M=1 if m <= 64 else 16,
                        num_warps=warps, num_stages=3))
    return out


def setup_sglang(device: str) -> None:
    """What SGLang's kernels read at run time: published ServerArgs (Triton MoE runner) and world-size-1 groups."""
    import tempfile

    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    publish(ServerArgs(model_path="dummy", device=device, moe_runner_backend="triton"), role="tune_moe")
    ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                    distributed_init_method=f"file://{tempfile.mkdtemp()}/init")
    ps.initialize_model_parallel(tensor_model_parallel_size=1)


def config_file_name(n: int) -> str:
    from sglang.srt.layers.moe.moe_runner.triton_utils import get_config_file_name

    return get_config_file_name(E, n, None)


def sglang_current_config(n: int, m: int, w1_shape, w2_shape) -> dict:
    """What SGLang uses for this shape today without our files (bundled JSON if any, else its default)."""
    from sglang.srt.layers.moe.moe_runner.triton_utils import try_get_optimal_moe_config

    return dict(try_get_optimal_moe_config(w1_shape, w2_shape, TOPK, None, m))


class Case:
    """Random bf16 weights for one TP shape; inputs and routing per M."""

    def __init__(self, tp: int, device):
        import torch

        self.n = INTER // tp
        g = torch.Generator(device=device).manual_seed(tp)
        self.w1 = torch.randn(E, 2 * self.n, HIDDEN, device=device, dtype=torch.bfloat16, generator=g) * 0.02
        self.w2 = torch.randn(E, HIDDEN, self.n, device=device, dtype=torch.bfloat16, generator=g) * 0.02
        self.device = device

    def inputs(self, m: int):
        import torch
        from sglang.srt.layers.moe.topk import StandardTopKOutput

        g = torch.Generator(device=self.device).manual_seed(m)
        x = torch.randn(m, HIDDEN, device=self.device, dtype=torch.bfloat16, generator=g)
        logits = torch.randn(m, E, device=self.device, generator=g)
        w, ids = torch.topk(torch.sigmoid(logits), TOPK, dim=-1)
        return x, StandardTopKOutput(w.float(), ids.to(torch.int32), logits)

    def time_us(self, m: int, config: dict | None, warmup: int, iters: int) -> float:
        import torch
        from sglang.srt.layers.moe.moe_runner.base import MoeRunnerConfig
        from sglang.srt.layers.moe.moe_runner.triton_utils import fused_experts, override_config

        x, topk = self.inputs(m)
        rc = MoeRunnerConfig(num_experts=E, num_local_experts=E, top_k=TOPK, activation="silu", inplace=False,
                             gemm1_alpha=SWIGLU_ALPHA, gemm1_clamp_limit=SWIGLU_LIMIT, gate_up_interleaved=False)

        def call():
            if config is None:
                return fused_experts(x, self.w1, self.w2, topk, rc)
            with override_config(config):
                return fused_experts(x, self.w1, self.w2, topk, rc)

        for _ in range(warmup):  # compiles this config outside the graph
            call()
        torch.cuda.synchronize()
        # Timed as CUDA-graph replays of GRAPH_CALLS calls, as the server's decode graph runs them: timing eager
        # calls at small M measures Python launch overhead (~0.6 ms per call seen on an H200), not the kernels.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(GRAPH_CALLS):
                call()
        graph.replay()
        times = []
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            graph.replay()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3 / GRAPH_CALLS)
        del graph
        return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", default="1,2,4,8", help="TP sizes (N = 3072 / TP)")
    ap.add_argument("--m", default=",".join(map(str, DEFAULT_M)), help="token counts to tune")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop tuning after this many seconds")
    ap.add_argument("--out", default=os.environ.get("OUT") or "tune_moe_out")
    ap.add_argument("--dry-run", action="store_true", help="print the search space and file names, run nothing")
    args = ap.parse_args(argv)
    tps = [int(t) for t in args.tp.split(",") if t]
    ms = [int(m) for m in args.m.split(",") if m]
    if args.dry_run:
        for m in ms:
            print(f"M={m}: {len(candidates(m))} candidate configs")
        for tp in tps:
            print(f"TP{tp}: N={INTER // tp} w13 [{E}, {2 * INTER // tp}, {HIDDEN}] w2 [{E}, {HIDDEN}, {INTER // tp}]")
        return

    import torch
    import triton

    device = torch.device("cuda")
    setup_sglang("cuda")
    t_end = time.monotonic() + args.budget_s
    version_dir = f"triton_{triton.__version__.replace('.', '_')}"
    out = Path(args.out)
    (out / "configs" / version_dir).mkdir(parents=True, exist_ok=True)
    report = dict(device=torch.cuda.get_device_name(), triton=triton.__version__, budget_s=args.budget_s, shapes=[])
    for tp in tps:
        case = Case(tp, device)
        shape = dict(tp=tp, n=case.n, file=config_file_name(case.n), m={}, not_reached=[])
        report["shapes"].append(shape)
        best_by_m = {}
        for m in ms:
            if time.monotonic() > t_end:
                shape["not_reached"].append(m)
                continue
            current = sglang_current_config(case.n, m, case.w1.shape, case.w2.shape)
            try:
                cur_us = case.time_us(m, current, args.warmup, args.iters)
            except Exception as e:  # noqa: BLE001 -- seen on an H200: SGLang's default at M=256 needs 240 KB smem
                print(f"  TP{tp} M={m} SGLang's config {current}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                cur_us = float("inf")
            best, best_us = current, cur_us
            for cfg in candidates(m):
                if time.monotonic() > t_end:
                    break
                try:
                    us = case.time_us(m, cfg, args.warmup, args.iters)
                except Exception as e:  # noqa: BLE001 -- a config the kernel rejects (e.g. out of shared memory)
                    print(f"  TP{tp} M={m} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                if us < best_us:
                    best, best_us = cfg, us
            best_by_m[m] = best
            shape["m"][m] = dict(best=best, best_us=best_us, sglang_config=current,
                                 sglang_us=cur_us if cur_us < float("inf") else None,
                                 gain=cur_us / best_us if cur_us < float("inf") else None)
            print(f"TP{tp} N={case.n} M={m}: SGLang {cur_us:.1f} us -> tuned {best_us:.1f} us "
                  f"(x{cur_us / best_us:.2f}) {best}", flush=True)
            # written after every M: a run stopped by the step's time limit keeps what it tuned
            (out / "configs" / version_dir / shape["file"]).write_text(
                json.dumps({str(k): c for k, c in best_by_m.items()}, indent=4))
            (out / "tune_moe.json").write_text(json.dumps(report, indent=1, default=str))
        del case
        torch.cuda.empty_cache()
    (out / "tune_moe.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {out}/configs/{version_dir}/ and tune_moe.json")


if __name__ == "__main__":
    main()
