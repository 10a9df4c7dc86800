"""Compile the Triton kernels a warm-up launches on a thread pool, before the warm-up runs (cold decode-graph
capture time, issue 9 §4).

A cold warm-up compiles its kernel variants one after the other, each on first launch (seconds each; the indexer's
merge kernel, with its bitonic top-k, is among the slowest). Triton 3.6 can compile in the background
(``triton.runtime._async_compile.AsyncCompileMode``): a launch made with ``warmup=True`` under that mode submits
the compile to an executor and returns at once, and leaving the mode waits for every compile and files each kernel
in its JIT cache. ``compile_in_parallel(fn)`` runs ``fn`` once that way -- every launch of ``fn`` becomes a
submitted compile, nothing runs on the GPU -- so that the real ``fn()`` afterwards finds every kernel compiled.
``fn`` must launch the same kernels whatever the values it computes (true of ``kernels.warmup``: no host reads of
device values), and is called with garbage in every kernel output: it must not hand a kernel's output to a
non-Triton op that indexes memory with it (a garbage index there is an illegal access that ends the process).
``kernels.warmup`` and the wrappers it calls only pass kernel outputs on to other Triton kernels.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import ThreadPoolExecutor


@contextlib.contextmanager
def _launches_only_compile():
    from triton.runtime import jit

    original = jit.JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        return original(self, *args, grid=grid, warmup=True, **kwargs)

    jit.JITFunction.run = compile_only
    try:
        yield
    finally:
        jit.JITFunction.run = original


def compile_in_parallel(fn, *, workers: int | None = None) -> int:
    """Run ``fn()`` with every Triton launch turned into a compile on ``workers`` threads (default: the CPU count,
    at most 16), and wait for all of them. Returns the number of distinct compiles submitted (cache hits included:
    Triton's on-disk cache answers those without compiling). Raises what a compile raises."""
    from triton.runtime import _async_compile

    workers = workers or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        try:
            with _async_compile.AsyncCompileMode(pool) as mode, _launches_only_compile():
                fn()
        finally:
            # Leaving the mode after a failed compile raises before it resets itself: later launches would then
            # submit to this (shut-down) pool.
            _async_compile.active_mode.set(None)
        return len(mode.future_kernels)
