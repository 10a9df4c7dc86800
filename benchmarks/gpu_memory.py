"""One sampler while a server runs (used by benchmarks/e2e.py): every `interval` seconds, nvidia-smi's memory,
utilization, SM clock, power and temperature per GPU, and a /proc snapshot of the server's process tree
(benchmarks/proc_cpu.py), timestamped. The same samples give the peak memory over the server's life and, over a
measured workload's window, the GPUs' clocks and the server processes' CPU use.

nvidia-smi's memory.used counts everything a process holds on the device (weights, KV pool, CUDA graphs, the
caching allocator's reserve, NCCL buffers), which is what "peak memory per GPU" means for capacity; SGLang's own
log lines count only parts of it. Sampling every `interval` seconds can miss a spike shorter than that.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import threading
import time

from proc_cpu import cpu_summary, snapshot


class ServerSampler:
    """Context manager: a thread records `samples`, each (time.monotonic() s, {GPU index: (utilization.gpu %,
    clocks.sm MHz, power.draw W, temperature.gpu °C)}, proc_cpu.snapshot of `root_pid`'s tree, {} while it is
    None); `peak_mib` maps GPU index -> the largest memory.used (MiB) seen; `gpu_numa` GPU index -> its PCI
    device's NUMA node. No GPU rows without nvidia-smi, no processes off Linux; a field nvidia-smi reports as
    "[N/A]" is None. Clocks and CPU per window tell a slow run from a throttled GPU or a starved scheduler
    (sessions 18 and 19: the same workload's batch-1 ITL 2.14 and 1.81 ms)."""

    QUERY = "index,memory.used,utilization.gpu,clocks.sm,power.draw,temperature.gpu"

    def __init__(self, interval: float = 0.5, root_pid: int | None = None):
        self.interval, self.root_pid = interval, root_pid
        self.peak_mib, self.samples, self.gpu_numa = {}, [], {}
        self._smi = shutil.which("nvidia-smi") is not None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _nvidia_smi(self, query: str) -> list[str]:
        try:
            return subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        except (OSError, subprocess.SubprocessError):
            return []

    def sample(self) -> None:
        """Take one sample now (the thread does, every `interval` s)."""
        t = time.monotonic()
        try:
            procs = snapshot(self.root_pid) if self.root_pid else {}
        except Exception:  # noqa: BLE001 -- whatever /proc holds, the GPU row of this sample stays
            procs = {}
        self.add(t, self._nvidia_smi(self.QUERY) if self._smi else [], procs)

    def add(self, t: float, lines: list[str], procs: dict | None = None) -> None:
        """One sample: nvidia-smi csv lines of QUERY's fields, and a process snapshot."""

        def number(x):
            try:
                return float(x)
            except ValueError:
                return None  # "[N/A]" (e.g. power on some boards)

        gpus = {}
        for line in lines:
            try:
                idx, used, *rest = (x.strip() for x in line.split(","))
                idx = int(idx)
                self.peak_mib[idx] = max(int(used), self.peak_mib.get(idx, 0))
            except ValueError:
                continue
            gpus[idx] = tuple(number(x) for x in rest)
        self.samples.append((t, gpus, procs or {}))

    def window(self, t0: float = float("-inf"), t1: float = float("inf")) -> list[tuple]:
        """A copy of the samples taken at t0 <= time <= t1 (monotonic s). A sample is appended after its nvidia-smi
        call returns: one taken just before t1 may still be on its way, so a caller summarizing [t0, now] calls
        `settle(t1)` first."""
        return [s for s in list(self.samples) if t0 <= s[0] <= t1]

    def settle(self, t1: float) -> None:
        """Wait (at most interval + 2 s) until the thread has appended a sample taken after t1 (monotonic s); returns
        at once when the thread is not running."""
        deadline = time.monotonic() + self.interval + 2
        while self._thread.is_alive() and time.monotonic() < deadline:
            if self.samples and self.samples[-1][0] > t1:
                return
            time.sleep(0.05)

    def gpu_summary(self, t0: float = float("-inf"), t1: float = float("inf"), gpus=None) -> dict:
        """Per GPU (all, or the indices in `gpus`), over the samples in [t0, t1] (monotonic s) with the GPU busy
        (utilization > 0: the benchmark client's own start-up and prompt generation leave it idle): median and
        lowest SM clock (MHz), median power (W), highest temperature (°C), and how many samples were busy of all."""
        rows = {}
        for _, g, _ in self.window(t0, t1):
            for i, row in g.items():
                if gpus is None or i in gpus:
                    rows.setdefault(i, []).append(row)
        out = {}
        for i in sorted(rows):
            busy = [s for s in rows[i] if s[0]]
            cols = [[s[j] for s in busy if s[j] is not None] for j in (1, 2, 3)]
            out[i] = {"sm_mhz_median": statistics.median(cols[0]) if cols[0] else None,
                      "sm_mhz_min": min(cols[0], default=None),
                      "power_w_median": statistics.median(cols[1]) if cols[1] else None,
                      "temp_c_max": max(cols[2], default=None), "samples": len(busy), "all_samples": len(rows[i])}
        return out

    def cpu_summary(self, t0: float = float("-inf"), t1: float = float("inf"), gpus=None, hz=None) -> dict:
        """proc_cpu.cpu_summary per process kind over the intervals between consecutive samples in [t0, t1] that
        have the GPUs (`gpus`, default all) busy at both ends -- the GPU summary's samples -- or over all of them
        where nvidia-smi gave none in the window (CPU)."""
        win = self.window(t0, t1)
        pairs = list(zip(win, win[1:]))
        if any(i in g for _, g, _ in win for i in (g if gpus is None else gpus)):
            busy = lambda g: any(row[0] for i, row in g.items() if gpus is None or i in gpus)  # noqa: E731
            pairs = [(a, b) for a, b in pairs if busy(a[1]) and busy(b[1])]
        return cpu_summary([((a[0], a[2]), (b[0], b[2])) for a, b in pairs], hz)

    def _run(self) -> None:
        if self._smi:  # once: each GPU's NUMA node, beside the cores the server's processes ran on
            for line in self._nvidia_smi("index,pci.bus_id"):
                try:
                    idx, bus = (x.strip() for x in line.split(","))
                    domain, _, rest = bus.lower().partition(":")  # "00000000:18:00.0" -> sysfs "0000:18:00.0"
                    with open(f"/sys/bus/pci/devices/{domain[-4:]}:{rest}/numa_node") as f:
                        node = int(f.read())
                    self.gpu_numa[int(idx)] = node if node >= 0 else None  # -1: the host has no NUMA nodes
                except (OSError, ValueError):
                    pass
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception:  # noqa: BLE001 -- one failed sample must not end the measurement
                pass

    def __enter__(self) -> "ServerSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)


def weight_memory_gb(log: str) -> list[float]:
    """Per-rank weight memory as SGLang logs it after loading ("Load weight end. ... mem usage=12.34 GB."), GB."""
    return [float(x) for x in re.findall(r"Load weight end\.[^\n]*?mem usage=([\d.]+) GB", log)]
