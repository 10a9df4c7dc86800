"""Decode-graph warm-up compiles a fixed set of Triton kernel variants, whatever batch sizes are captured (issue 9
§4: cold capture time). Oracle: Triton's own cache key for each launch (its binder for a CUDA sm_90 target and
``compute_cache_key``, as ``JITFunction.run`` looks kernels up), computed on CPU with nothing compiled or run
(benchmarks/capture_variants.record_launches). One distinct key = one compile on a GPU."""

from __future__ import annotations

import pytest

from benchmarks import capture_variants as cv

# The variants by design, for M3's per-rank shapes (bf16): the per-forward metadata kernel; the fused K/V/index-key
# store and the dense layers' K/V store (its variant without the index lane); the indexer's split kernel + merge (batches > INDEXER_TWO_PASS_MAX_TILES) and its two-pass score kernel +
# select (smaller); the attention kernel with split partials + merge, and (TP1: 4 KV heads fill the SMs from bs 33)
# without splits, writing the output directly.
# ("store": _store_kv_index_kernel's two, or _store_index_k_kernel where the pool writes K/V itself.)
DESIGN = {"tp1": {"_meta_kernel": 1, "store": 2, "_indexer_kernel": 2, "_indexer_merge_kernel": 1,
                  "_indexer_select_kernel": 1, "_sparse_attn_kernel": 2, "_sparse_attn_merge_kernel": 1},
          "tp8": {"_meta_kernel": 1, "store": 2, "_indexer_kernel": 2, "_indexer_merge_kernel": 1,
                  "_indexer_select_kernel": 1, "_sparse_attn_kernel": 1, "_sparse_attn_merge_kernel": 1}}


@pytest.mark.parametrize("heads", ["tp1", "tp8"])
def test_warmup_compiles_the_same_variants_for_any_batch_sizes(heads):
    per_bs = {bs: cv.recorded_variants([bs], heads) for bs in range(1, 65)}  # a fresh workspace each
    every = {name: set().union(*(seen.get(name, set()) for seen in per_bs.values()))
             for name in set().union(*per_bs.values())}
    # bs 1..64 together compile the design's variants and no more: the batch size (a grid size, and the integer
    # arguments derived from it) is not part of any kernel's key.
    counts = {("store" if name.startswith("_store") else name): len(keys) for name, keys in every.items()}
    assert counts == DESIGN[heads], counts
    # SGLang's capture list, warmed as the backend warms it (one workspace), compiles the same set.
    assert cv.recorded_variants(cv.SGLANG_CAPTURED_64, heads) == every


def test_recorder_sees_integer_specialisation():
    """The recorder is Triton's key: an integer argument without do_not_specialize gets one key per class
    (== 1, divisible by 16, other), a do_not_specialize one a single key; constexprs key by value."""
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def plain(x_ptr, n, C: tl.constexpr):
        tl.store(x_ptr + n, C)

    @triton.jit(do_not_specialize=["n"])
    def unspecialised(x_ptr, n, C: tl.constexpr):
        tl.store(x_ptr + n, C)

    x = torch.zeros(64)
    with cv.record_launches() as seen:
        for n in (1, 2, 3, 16, 32, 48):
            plain[(1,)](x, n, C=1)
            unspecialised[(1,)](x, n, C=1)
        unspecialised[(1,)](x, 5, C=2)
    assert len(seen["plain"]) == 3
    assert len(seen["unspecialised"]) == 2


# ---- benchmarks/capture_time.py: compiles inside the capture window, from Triton's compilation listener ----------

LISTENER_PROBE = """
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

@triton.jit
def probe_kernel(x_ptr, C: tl.constexpr):
    tl.store(x_ptr, C)

for c in (3, 3, 4):  # the second is a cache hit
    triton.compile(ASTSource(probe_kernel, {"x_ptr": "*fp32", "C": "constexpr"}, {(1,): c}),
                   target=GPUTarget("cuda", 90, 32))
"""


def test_compile_listener_logs_each_compile(tmp_path):
    """The sitecustomize the capture-time server starts with logs every Triton compile of the process (here: two
    sm_90 compiles and one cache hit, compiled on CPU -- no GPU needed to compile)."""
    import json
    import os
    import subprocess
    import sys

    from benchmarks import capture_time

    log = tmp_path / "compiles.jsonl"
    env = {**os.environ, "M3_COMPILE_LOG": str(log), "TRITON_CACHE_DIR": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(capture_time.LISTENER), os.environ.get("PYTHONPATH", "")])}
    probe = tmp_path / "probe.py"  # (a file: triton.jit reads the kernel's source)
    probe.write_text(LISTENER_PROBE)
    out = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [(c["name"], c["cache_hit"]) for c in lines] == [("probe_kernel", False), ("probe_kernel", True),
                                                             ("probe_kernel", False)]
    assert all(c["s"] > 0 for c in lines if not c["cache_hit"])


SAMPLER_PROBE = """
import time

def waits_in_a_named_function():
    time.sleep(1.2)

def busy_elsewhere():
    t0 = time.time()
    while time.time() - t0 < 0.6:
        pass

waits_in_a_named_function()
busy_elsewhere()
"""


def test_stack_sampler_attributes_time_to_the_function_that_spent_it(tmp_path):
    """The stack sampler of the capture-time server (compile_listener's M3_STACK_LOG) in a real subprocess: a
    1.2-s sleep in one function and a 0.6-s busy loop in another come back as samples of those functions, and
    stack_summary turns them into seconds by innermost frame (within a sample interval per function and the
    scheduling slack of a loaded 2-core machine: 0.1-s samples, 0.3 s either way)."""
    import json
    import os
    import subprocess
    import sys
    import time

    from benchmarks import capture_time

    log = tmp_path / "stacks.jsonl"
    probe = tmp_path / "probe.py"
    probe.write_text(SAMPLER_PROBE)
    env = {**os.environ, "M3_STACK_LOG": str(log), "M3_STACK_INTERVAL": "0.1",
           "PYTHONPATH": os.pathsep.join([str(capture_time.LISTENER), os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    out = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    samples = [json.loads(x) for x in log.read_text().splitlines()]
    s = capture_time.stack_summary(samples, (t0, time.time()), 0.1)
    leaf = s["by_innermost_frame_s"]
    assert abs(leaf[f"{probe} waits_in_a_named_function"] - 1.2) <= 0.3, leaf
    assert abs(leaf[f"{probe} busy_elsewhere"] - 0.6) <= 0.3, leaf
    assert s["pid"] != os.getpid() and s["samples"] == len(samples)
    # several processes sample at the same rate: the one passing through a *capture* function is reported
    other = [{**x, "pid": -1, "stack": ["/x/sglang/srt/model_executor/cuda_graph_runner.py:9 capture_one"]}
             for x in samples]
    assert capture_time.stack_summary(samples + other, (t0, time.time()), 0.1)["pid"] == -1
    assert capture_time.stack_summary(samples, (t0 - 10, t0 - 5), 0.1) == {"samples": 0}  # outside the window
    assert capture_time.frame_site("/x/lib/python3.12/site-packages/tvm_ffi/cpp/load.py:88 build") == \
        "tvm_ffi/cpp/load.py build"
    assert capture_time.frame_site("/usr/lib/python3.12/subprocess.py:1264 wait") == "subprocess.py wait"
    # a sample that came late (the GIL held by C code) stands for the whole gap since the previous one
    late = [{"t": 0.0, "pid": 1, "stack": ["a.py:1 f"]}, {"t": 1.0, "pid": 1, "stack": ["b.py:1 g"]}]
    assert capture_time.stack_summary(late, (0.0, 2.0), 0.5)["by_innermost_frame_s"] == {"a.py f": 0.5, "b.py g": 1.0}
    torn = tmp_path / "torn.jsonl"
    torn.write_text(log.read_text() + '{"t": 1, "pid"')
    assert capture_time.read_jsonl(torn) == samples


def test_capture_window_and_compile_summary():
    from benchmarks import capture_time

    log = ("[2026-11-30 10:05:01] Load weight end.\n"
           "[2026-11-30 10:05:10 TP0] Capture target decode CUDA graph begin. backend=full, bs=[1, 2]\n"
           "[2026-11-30 10:05:40 TP0] Capture target decode CUDA graph end. elapsed=30.00 s, mem usage=1 GB\n")
    begin, end = capture_time.capture_window(log)
    assert end - begin == 31.0
    lines = [{"t": begin - 5, "name": "_indexer_kernel", "s": 2.0, "cache_hit": False},   # before: not counted
             {"t": begin + 1, "name": "_indexer_kernel", "s": 3.0, "cache_hit": False},
             {"t": begin + 2, "name": "fused_moe_kernel", "s": 4.0, "cache_hit": False},
             {"t": begin + 3, "name": "fused_moe_kernel", "s": 0.1, "cache_hit": True}]   # a hit: no compile
    s = capture_time.compile_summary(lines, (begin, end))
    assert (s["in_capture"]["compiles"], s["in_capture"]["compile_s"]) == (2, 7.0)
    assert (s["in_capture"]["ours_compiles"], s["in_capture"]["ours_compile_s"]) == (1, 3.0)
    assert (s["all"]["compiles"], s["all"]["ours_compile_s"]) == (3, 5.0)
    assert capture_time.capture_window("no capture here") is None


# ---- sglang_m3.attention.kernels.precompile: the warm-up's compiles on a thread pool, nothing launched -----------

def test_compile_in_parallel_compiles_every_launch_and_launches_nothing(tmp_path, monkeypatch):
    """A stand-in CUDA driver for an sm_90 target (compiling needs no GPU; loading and launching do): every
    distinct launch of the function is compiled once and filed in the kernel's JIT cache, and nothing is launched
    (a launch needs the driver's loader, which the stand-in lacks -- shown by the launch afterwards failing)."""
    import torch
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from sglang_m3.attention.kernels.precompile import compile_in_parallel

    class NoGpu:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    @triton.jit
    def toy(x_ptr, n, C: tl.constexpr):
        tl.store(x_ptr + n, C)

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    x = torch.zeros(8)
    monkeypatch.setattr(driver, "_active", NoGpu())  # (restored after the test)
    submitted = compile_in_parallel(lambda: [toy[(1,)](x, 5, C=c) for c in (1, 2, 2)], workers=2)
    assert submitted == 2
    assert sum(len(c[0]) for c in toy.device_caches.values()) == 2
    with pytest.raises(AttributeError):  # a real launch reaches for the driver's loader
        toy[(1,)](x, 5, C=1)
