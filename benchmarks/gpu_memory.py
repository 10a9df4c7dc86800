"""Peak GPU memory per device while a server runs: nvidia-smi polled from a thread (used by benchmarks/e2e.py).

nvidia-smi's memory.used counts everything a process holds on the device (weights, KV pool, CUDA graphs, the
caching allocator's reserve, NCCL buffers), which is what "peak memory per GPU" means for capacity; SGLang's own
log lines count only parts of it. Sampling every `interval` seconds can miss a spike shorter than that.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading


class PeakMemory:
    """Context manager: `peak_mib` maps GPU index -> largest memory.used (MiB) seen; empty without nvidia-smi."""

    def __init__(self, interval: float = 1.0):
        self.interval, self.peak_mib = interval, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        for line in out.strip().splitlines():
            idx, used = (int(x) for x in line.split(","))
            self.peak_mib[idx] = max(used, self.peak_mib.get(idx, 0))

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
