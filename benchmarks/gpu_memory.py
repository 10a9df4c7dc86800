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
    """Context manager: `peak_mib` maps GPU index -> largest memory.used (MiB) seen; `sm_mhz`, `power_w` and
    `temp_c` map it to every sample of clocks.sm (MHz), power.draw (W) and temperature.gpu (°C) -- so a slow run
    can be told from a throttled GPU (session 19: the same command's batch-1 ITL moved 18 % between two leases).
    All empty without nvidia-smi; a field nvidia-smi reports as "[N/A]" is left out."""

    QUERY = "index,memory.used,clocks.sm,power.draw,temperature.gpu"

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak_mib = interval, {}
        self.sm_mhz, self.power_w, self.temp_c = {}, {}, {}
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
        for store, value in zip((self.sm_mhz, self.power_w, self.temp_c), rest):
            try:
                store.setdefault(idx, []).append(float(value))
            except ValueError:
                pass  # "[N/A]" (e.g. power on some boards)

    def summary(self, gpus=None) -> dict:
        """Per GPU (all, or the indices in `gpus`): median and lowest SM clock, median power, highest temperature."""
        def med(xs):
            return statistics.median(xs) if xs else None
        return {i: {"sm_mhz_median": med(self.sm_mhz.get(i)), "sm_mhz_min": min(self.sm_mhz.get(i) or [None]),
                    "power_w_median": med(self.power_w.get(i)), "temp_c_max": max(self.temp_c.get(i) or [None]),
                    "samples": len(self.sm_mhz.get(i, []))}
                for i in sorted(self.peak_mib) if gpus is None or i in gpus}

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
