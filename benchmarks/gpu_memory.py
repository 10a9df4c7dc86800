"""GPU memory, SM clock, power and temperature per device while a server runs or a workload is measured:
nvidia-smi polled from a thread (used by benchmarks/e2e.py).

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


class PeakMemory:
    """Context manager: `peak_mib` maps GPU index -> largest memory.used (MiB) seen; `samples` maps it to every
    (utilization.gpu %, clocks.sm MHz, power.draw W, temperature.gpu °C) read, so a slow run can be told from a
    throttled GPU (sessions 18 and 19: the same workload's batch-1 ITL 2.14 and 1.81 ms). Empty without
    nvidia-smi; a field it reports as "[N/A]" is None."""

    QUERY = "index,memory.used,utilization.gpu,clocks.sm,power.draw,temperature.gpu"

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak_mib, self.samples = interval, {}, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        for line in out.strip().splitlines():
            self.add(line)

    def add(self, line: str) -> None:
        """One nvidia-smi csv line of QUERY's fields."""
        idx, used, *rest = (x.strip() for x in line.split(","))
        idx = int(idx)
        self.peak_mib[idx] = max(int(used), self.peak_mib.get(idx, 0))

        def number(x):
            try:
                return float(x)
            except ValueError:
                return None  # "[N/A]" (e.g. power on some boards)

        self.samples.setdefault(idx, []).append(tuple(number(x) for x in rest))

    def summary(self, gpus=None) -> dict:
        """Per GPU (all, or the indices in `gpus`), over the samples with the GPU busy (utilization > 0: the
        benchmark client's own start-up and prompt generation leave it idle): median and lowest SM clock, median
        power, highest temperature, and how many samples were busy of all."""
        out = {}
        for i in sorted(self.samples):
            if gpus is not None and i not in gpus:
                continue
            busy = [s for s in self.samples[i] if s[0]]
            cols = [[s[j] for s in busy if s[j] is not None] for j in (1, 2, 3)]
            out[i] = {"sm_mhz_median": statistics.median(cols[0]) if cols[0] else None,
                      "sm_mhz_min": min(cols[0], default=None),
                      "power_w_median": statistics.median(cols[1]) if cols[1] else None,
                      "temp_c_max": max(cols[2], default=None), "samples": len(busy), "all_samples": len(self.samples[i])}
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except (OSError, ValueError, subprocess.SubprocessError):
                pass  # one failed sample must not end the measurement

    def __enter__(self) -> "PeakMemory":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)


def weight_memory_gb(log: str) -> list[float]:
    """Per-rank weight memory as SGLang logs it after loading ("Load weight end. ... mem usage=12.34 GB."), GB."""
    return [float(x) for x in re.findall(r"Load weight end\.[^\n]*?mem usage=([\d.]+) GB", log)]
