#!/usr/bin/env python
"""What SGLang's compile-at-first-use pieces on M3's decode path cost on a cold host, and what replaces them
(issue 9 §4: decode-graph capture <= 30 s cold).

Four of SGLang's pieces compile on their first call, i.e. inside the decode-graph capture, and keep the result in
per-host caches (not per server: a second server on the same host starts warm):
- the hidden-size Gemma RMSNorms: sgl_kernel's `gemma_rmsnorm` / `gemma_fused_add_rmsnorm` call flashinfer's norm
  module, built with nvcc at first use (~/.cache/flashinfer). The model's `PrecompiledGemmaRMSNorm` (layers/norm.py)
  calls sgl_kernel's precompiled copies of the same kernels instead.
- the dense layers' K/V store: `MHATokenToKVPool` writes rows with its JIT `store_cache` CUDA kernel (tvm-ffi,
  nvcc; ~/.cache/tvm-ffi). M3KVPool writes them with our Triton `store_kv` instead (pool.py).
- the fused-MoE clamped SwiGLU (`swiglu_no_interleaved_with_alpha_and_limit`) and the expert sum-reduce at <= 32
  tokens (`moe_sum_reduce_torch_compile`): torch.compile, inductor (/tmp/torchinductor_<user>). Measured against
  our Triton `swigluoai_triton` and sgl_kernel's CUDA `moe_sum_reduce` (session 13: a few seconds of cold
  compiles against ~0.3-0.6 us more per MoE layer and decode step for the replacements; SGLang's stay).

Measured in one fresh process with fresh flashinfer, tvm-ffi, inductor and Triton caches (a fresh host's state):
- first call (wall s, synchronized) of each piece and its replacement at decode token counts, largest first as
  SGLang captures (the compiled helpers recompile once for a dynamic shape; the first includes inductor's start);
- steady state: median us per call from CUDA-graph replays (20 calls per graph) at 1, 8 and 32 tokens.

Shapes: M3 at TP1 (or --tp): I = 3072 / TP per expert, hidden 6144, top-k 4; the dense layers' K/V rows
4 / TP KV heads (at least 1) x 128, bf16; the norms: the fused residual add + norm over the hidden size.

    python benchmarks/cold_start.py --out $OUT        # GPU; cold_start.json / .md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, TOPK, ALPHA, LIMIT, HEAD_DIM, KV_HEADS = 6144, 4, 1.702, 7.0, 128, 4  # M3_SPEC §1.1
CAPTURE_TOKENS = (64, 48, 32, 16, 8, 4, 2, 1)  # a subset of bs <= 64, in SGLang's capture order (largest first)
TIMED_TOKENS = (1, 8, 32)
GRAPH_CALLS, REPLAYS = 20, 20
SLOTS = 4096


def pieces(tp: int) -> dict:
    """name -> (call(inputs), inputs(tokens), whether the server runs it at that token count). SGLang's piece first,
    then what replaces it for M3."""
    import torch
    from sgl_kernel import gemma_fused_add_rmsnorm, moe_sum_reduce
    from sglang.kernels.ops.kvcache.kvcache import store_cache
    from sglang.srt.layers.moe.moe_runner.triton_utils import fused_moe

    from sglang_m3.attention.kernels import store_kv
    from sglang_m3.layers.swiglu_triton import swigluoai_triton

    inter, heads = 3072 // tp, max(1, KV_HEADS // tp)
    row = heads * HEAD_DIM
    cuda = dict(device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = torch.zeros(SLOTS, heads, HEAD_DIM, **cuda), torch.zeros(SLOTS, heads, HEAD_DIM, **cuda)

    def gate_up(t):
        return (torch.randn(t * TOPK, 2 * inter, **cuda) * 4,)

    def per_expert(t):
        return torch.randn(t, TOPK, HIDDEN, **cuda), torch.empty(t, HIDDEN, **cuda)

    def kv_rows(t):
        return (torch.randn(t, heads, HEAD_DIM, **cuda), torch.randn(t, heads, HEAD_DIM, **cuda),
                torch.randperm(SLOTS - 1, device="cuda")[:t] + 1)

    def jit_store(k, v, loc):  # as MHATokenToKVPool calls it: rows of Hkv * D
        store_cache(k.view(-1, row), v.view(-1, row), k_cache.view(-1, row), v_cache.view(-1, row), loc)

    norm_w = torch.randn(HIDDEN, **cuda) * 0.1

    def hidden_rows(t):
        return torch.randn(t, HIDDEN, **cuda), torch.randn(t, HIDDEN, **cuda)

    everywhere, small = (lambda t: True), (lambda t: t <= 32)
    return {
        "sglang_gemma_add_rmsnorm_flashinfer_jit": (lambda x, r: gemma_fused_add_rmsnorm(x, r, norm_w, 1e-6),
                                                    hidden_rows, everywhere),
        "ours_gemma_add_rmsnorm_precompiled": (lambda x, r: torch.ops.sgl_kernel.gemma_fused_add_rmsnorm.default(
            x, r, norm_w, 1e-6, True), hidden_rows, everywhere),
        "sglang_kv_store_cache_jit": (jit_store, kv_rows, everywhere),
        "ours_store_kv_triton": (lambda k, v, loc: store_kv(k_cache, v_cache, loc, k, v), kv_rows, everywhere),
        "sglang_swiglu_compiled": (lambda gu: fused_moe.swiglu_no_interleaved_with_alpha_and_limit(gu, ALPHA, LIMIT),
                                   gate_up, everywhere),
        "ours_swigluoai_triton": (lambda gu: swigluoai_triton(gu, ALPHA, LIMIT), gate_up, everywhere),
        "sglang_sum_reduce_compiled": (lambda x, out: fused_moe.moe_sum_reduce_torch_compile(x, out, 1.0),
                                       per_expert, small),
        "sgl_kernel_moe_sum_reduce": (lambda x, out: moe_sum_reduce(x, out, 1.0), per_expert, small),
    }


def first_calls(call, inputs, used) -> dict:
    import torch

    firsts = {}
    for t in CAPTURE_TOKENS:
        if used(t):
            args = inputs(t)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call(*args)
            torch.cuda.synchronize()
            firsts[t] = round(time.perf_counter() - t0, 3)
    return {"by_tokens": firsts, "sum": round(sum(firsts.values()), 2)}


def steady_us(call, inputs, used) -> dict:
    from kernel_timing import graph_replay_us

    out = {}
    for t in TIMED_TOKENS:
        if used(t):
            args = inputs(t)
            for _ in range(3):
                call(*args)
            out[t] = round(graph_replay_us(lambda: call(*args), GRAPH_CALLS, REPLAYS), 2)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "./cold_start_out")))
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    fresh = tempfile.mkdtemp(prefix="cold_start_")  # before anything compiles: every per-host cache cold
    for var, sub in (("FLASHINFER_WORKSPACE_BASE", "flashinfer"), ("TVM_FFI_CACHE_DIR", "tvm-ffi"),
                     ("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        os.environ[var] = f"{fresh}/{sub}"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import torch

    parts = pieces(args.tp)
    res = {"tp": args.tp, "device": torch.cuda.get_device_name(), "first_call_s": {}, "steady_us": {}}
    for name, piece in parts.items():
        res["first_call_s"][name] = first_calls(*piece)
    for name, piece in parts.items():
        res["steady_us"][name] = steady_us(*piece)
    (args.out / "cold_start.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [f"{res['device']}, M3 shapes at TP{args.tp}, bf16; fresh flashinfer, tvm-ffi, inductor and Triton caches",
             "",
             "| piece | first calls, sum s | first call s | us at 1 / 8 / 32 tokens |", "|---|---|---|---|"]
    for name in parts:
        f, s = res["first_call_s"][name], res["steady_us"][name]
        lines.append(f"| {name} | {f['sum']} | {next(iter(f['by_tokens'].values()))} | "
                     f"{' / '.join(str(s.get(t, '-')) for t in TIMED_TOKENS)} |")
    (args.out / "cold_start.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
