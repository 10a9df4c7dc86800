"""Timing and comparison helpers of the MSA kernel benchmark: CUDA-graph capture, median replay time with an L2 flush,
the copy bandwidth that defines the HBM floor, memory-fit checks, and output / selection differences."""

from __future__ import annotations

import statistics

import torch

# ----------------------------------------------------------------------------------------------------------------
# timing (CUDA)
# ----------------------------------------------------------------------------------------------------------------


class Timer:
    def __init__(self, device, iters: int, flush_l2: bool):
        self.iters = iters
        props = torch.cuda.get_device_properties(device)
        l2 = getattr(props, "L2_cache_size", 50 << 20)
        self.flush_buf = torch.empty(max(2 * l2, 64 << 20), dtype=torch.uint8, device=device) if flush_l2 else None

    def _median_us(self, run, iters) -> float:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            if self.flush_buf is not None:
                self.flush_buf.zero_()
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3

    def graph_us(self, graph: torch.cuda.CUDAGraph) -> float:
        for _ in range(3):
            graph.replay()
        return self._median_us(graph.replay, self.iters)

    def eager_us(self, fn, iters: int) -> float:
        return self._median_us(fn, iters)

    def graph_kernels_us(self, graph: torch.cuda.CUDAGraph, replays: int = 10) -> dict[str, float]:
        """GPU time of each kernel of one replay, µs (the torch profiler's CUDA kernel records over `replays`
        replays, each after the same L2 flush as graph_us, summed by kernel name and divided by `replays`),
        largest first. The flush's own fill kernel is left out. Says where a graph's time goes; the sum is below
        graph_us by the launch gaps between kernels."""
        from torch.profiler import ProfilerActivity, profile

        graph.replay()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(replays):
                if self.flush_buf is not None:
                    self.flush_buf.zero_()
                graph.replay()
            torch.cuda.synchronize()
        per_name: dict[str, float] = {}
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA and not _is_flush(ev.name):
                per_name[ev.name] = per_name.get(ev.name, 0.0) + ev.device_time_total
        return {k[:120]: round(v / replays, 2) for k, v in sorted(per_name.items(), key=lambda kv: -kv[1])}


def _is_flush(name: str) -> bool:
    # Timer's L2 flush: zero_() of a uint8 buffer (a fill kernel on unsigned char, or a memset record)
    return ("FillFunctor<unsigned char>" in name) or name.startswith("Memset")


def graph_replay_us(call, calls_per_graph: int, iters: int) -> float:
    """Median µs of one ``call()`` inside a CUDA graph of ``calls_per_graph`` back-to-back calls, as a decode graph
    runs them (no L2 flush; timing eager calls at small sizes would measure Python launch overhead, ~0.6 ms per call
    seen on an H200, not the kernels). Warm ``call`` up (compiles) before."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls_per_graph):
            call()
    graph.replay()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        graph.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / calls_per_graph)
    del graph
    return statistics.median(times)


def capture(fn) -> torch.cuda.CUDAGraph:
    """Warm up eagerly on a side stream (JIT compile, autotune), then capture one call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def copy_bandwidth(device, gib: float, iters: int = 10) -> float:
    """Bytes/s of a large device-to-device copy: 2 * bytes (read + write) / median time."""
    n = int(gib * 2 ** 30)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        dst.copy_(src)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / statistics.median(times)


def fits(nbytes: int, device) -> tuple[bool, str]:
    free, _ = torch.cuda.mem_get_info(device)
    need = int(nbytes * 1.05) + (2 << 30)  # caches + scratch, graphs and allocator slack
    return need <= free, f"needs ~{need / 2 ** 30:.1f} GiB, {free / 2 ** 30:.1f} GiB free"


def sel_mismatch(a: torch.Tensor, b: torch.Tensor) -> int:
    """(token, head) rows whose selected-block lists differ (both ascending, -1 padded)."""
    return int((a.to(torch.int32) != b.to(torch.int32)).any(dim=-1).sum())


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
