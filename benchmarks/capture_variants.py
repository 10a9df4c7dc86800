#!/usr/bin/env python
"""How many Triton kernel variants the decode-graph warm-up compiles, per batch-size set (issue 9 §4: capture
≤ 30 s cold for bs ≤ 64). Cold capture pays one Triton compile (seconds each) per distinct cache key of each of
our MSA kernels; batch size must not be part of that key (it is a grid size, and where an integer argument
follows it, the argument is ``do_not_specialize``: Triton otherwise keys on "== 1" and "divisible by 16").

Two modes:
  * ``--record`` (any machine, no GPU): runs ``kernels.warmup`` -- the code ``M3SparseAttnBackend`` runs in
    ``init_cuda_graph_state`` -- with every launch intercepted: Triton's own binder for a CUDA sm_90 target
    computes each launch's cache key (``JITFunction.run``'s ``compute_cache_key`` over the specialisation of
    every argument and the launch options), and nothing is compiled or run. One key = one compile on a GPU.
  * default on a GPU: the same warm-up for real, with a fresh ``TRITON_CACHE_DIR``, timed per batch size, and
    the compiled kernels counted from each kernel's in-memory cache (``device_caches``); then cold again with the
    compiles submitted to a thread pool first (``kernels.precompile.compile_in_parallel``).

    python benchmarks/capture_variants.py --record              # CPU: variants for bs 1..64, TP1 and TP8 heads
    python benchmarks/capture_variants.py --out $OUT            # GPU: cold warm-up seconds + compiles, as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Per-rank M3 decode shapes (M3_SPEC; kernel_inputs.HEADS): q heads, KV (= index) heads; head dim 128, index
# dim 128, block 128, top-16 blocks, 0 init / 1 local block, bf16.
HEADS = {"tp1": (64, 4), "tp8": (8, 1)}
SPARSE = dict(head_dim=128, head_dim_v=128, index_dim=128, block_size=128, topk_blocks=16, init_blocks=0,
              local_blocks=1)
# SGLang 0.5.17's decode capture list for --cuda-graph-max-bs 64 without speculative decoding
# (ServerArgs._generate_decode_cuda_graph_batch_sizes).
SGLANG_CAPTURED_64 = [1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64]
CONTEXT_LEN = 133120  # the e2e benchmark's --context-length: the req_to_token width


@contextlib.contextmanager
def record_launches():
    """Intercept every Triton launch in this process: yields {kernel name: {cache key}}; nothing compiles or runs.

    The key is the one ``JITFunction.run`` (Triton 3.6) looks its compiled kernel up by, from Triton's binder for
    a CUDA sm_90 target (pointer dtype + 16-byte alignment, integer ``== 1`` / ``% 16 == 0`` classes unless
    ``do_not_specialize``, constexpr values, num_warps/num_stages); a launch whose key is new would compile.
    Works on CPU tensors (the binder reads dtypes, data pointers and values only)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders: dict = {}
    seen: dict[str, set] = defaultdict(set)

    def run(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug) or jit.knobs.runtime.debug
        kwargs["instrumentation_mode"] = jit.knobs.compilation.instrumentation_mode
        if self not in binders:
            binders[self] = jit.create_function_from_signature(self.signature, self.params, backend)
        _, specialization, options = binders[self](*args, **kwargs)
        seen[self.fn.__name__].add(jit.compute_cache_key({}, specialization, options))
        return None

    original = jit.JITFunction.run
    jit.JITFunction.run = run
    try:
        yield seen
    finally:
        jit.JITFunction.run = original


def warmup(batch_sizes, heads: str, device: str = "cpu", dtype=None, kv_dtype=None) -> None:
    """``kernels.warmup`` as the backend calls it (fresh workspace, the e2e context length)."""
    import torch

    from sglang_m3.attention import kernels

    q_heads, kv_heads = HEADS[heads]
    kernels.warmup(kernels.MSAWorkspace(device), batch_sizes=batch_sizes, num_q_heads=q_heads,
                   num_kv_heads=kv_heads, dtype=dtype or torch.bfloat16, kv_dtype=kv_dtype, device=device,
                   context_len=CONTEXT_LEN, **SPARSE)


def recorded_variants(batch_sizes, heads: str) -> dict[str, set]:
    """{kernel: cache keys} that warming ``batch_sizes`` would compile (CPU, nothing launched)."""
    with record_launches() as seen:
        warmup(batch_sizes, heads)
    return {name: set(keys) for name, keys in seen.items()}


def record_report() -> dict:
    out = {}
    for heads in HEADS:
        every = recorded_variants(range(1, 65), heads)
        captured = recorded_variants(SGLANG_CAPTURED_64, heads)
        per_bs = {bs: sum(map(len, recorded_variants([bs], heads).values())) for bs in (1, 2, 16, 17, 32, 64)}
        out[heads] = {"bs 1..64": {k: len(v) for k, v in sorted(every.items())},
                      "total bs 1..64": sum(map(len, every.values())),
                      "total captured list": sum(map(len, captured.values())),
                      "total per single bs": per_bs}
    return out


def our_kernels() -> list:
    """Every Triton kernel (JITFunction) of sglang_m3.attention.kernels."""
    import importlib

    from triton.runtime.jit import JITFunction

    # (by module path: the package binds the names indexer/sparse_attention/... to functions too)
    mods = [importlib.import_module(f"sglang_m3.attention.kernels.{m}")
            for m in ("common", "indexer", "sparse_attention", "store")]
    return [v for m in mods for v in vars(m).values() if isinstance(v, JITFunction)]


def _cold(kernels) -> None:
    """A fresh on-disk Triton cache and empty in-memory JIT caches: the next launches compile."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton_capture_variants_")
    for k in kernels:
        k.device_caches.clear()


def _timed_warmups(batch_sizes, heads) -> dict:
    import torch

    times = {}
    for bs in batch_sizes:
        t0 = time.perf_counter()
        warmup([bs], heads, device="cuda")
        torch.cuda.synchronize()
        times[bs] = round(time.perf_counter() - t0, 3)
    return times


def gpu_report(batch_sizes) -> dict:
    """Cold warm-up on the GPU: seconds per batch size, the kernels compiled (from each kernel's in-memory cache),
    whether they are the ones the CPU recorder predicts; then cold again with the compiles done first on a thread
    pool (sglang_m3.attention.kernels.precompile), and the warm-up after it."""
    import torch

    from sglang_m3.attention.kernels.precompile import compile_in_parallel

    out = {"device": torch.cuda.get_device_name(), "cpus": os.cpu_count(), "batch_sizes": list(batch_sizes)}
    kernels = our_kernels()
    for heads in HEADS:
        predicted = {k: len(v) for k, v in recorded_variants(batch_sizes, heads).items()}
        _cold(kernels)
        times = _timed_warmups(batch_sizes, heads)
        compiled = {k.fn.__name__: sum(len(c[0]) for c in k.device_caches.values()) for k in kernels}
        compiled = {k: n for k, n in compiled.items() if n}
        res = {"warmup_s_per_bs": times, "warmup_s_total": round(sum(times.values()), 2),
               "compiled": compiled, "compiled_total": sum(compiled.values()),
               "cpu_recorder_predicted": predicted, "prediction_matches": predicted == compiled}
        _cold(kernels)
        t0 = time.perf_counter()
        submitted = compile_in_parallel(lambda: warmup(batch_sizes, heads, device="cuda"))
        res["parallel_compile_s"] = round(time.perf_counter() - t0, 2)
        res["parallel_submitted"] = submitted
        after = _timed_warmups(batch_sizes, heads)
        res["warmup_after_parallel_s_total"] = round(sum(after.values()), 2)
        again = {k.fn.__name__: sum(len(c[0]) for c in k.device_caches.values()) for k in kernels}
        res["parallel_compiled_same"] = {k: n for k, n in again.items() if n} == compiled
        out[heads] = res
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="count cache keys without a GPU (nothing compiles)")
    ap.add_argument("--bs", default=",".join(map(str, SGLANG_CAPTURED_64)),
                    help="GPU mode: batch sizes, '1-64' or a comma list (default: SGLang's capture list for 64)")
    ap.add_argument("--out", type=Path, default=None, help="write capture_variants.json here")
    args = ap.parse_args(argv)
    if args.record:
        report = record_report()
    else:
        lo, _, hi = args.bs.partition("-")
        bss = list(range(int(lo), int(hi) + 1)) if hi else [int(b) for b in args.bs.split(",")]
        report = gpu_report(bss)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "capture_variants.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
