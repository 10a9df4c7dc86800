"""Measurement aid for benchmarks/capture_time.py (not part of the package): with M3_COMPILE_LOG set, every Python
process started with this folder first on PYTHONPATH (the server and its spawned scheduler) appends one JSON line per
Triton compile to that file -- kernel name, seconds, cache hit, wall time, pid -- from Triton's compilation listener
(``triton.knobs.compilation.listener``, called by ``triton.compile`` with its CompileTimes)."""

import os

if os.environ.get("M3_COMPILE_LOG"):
    try:
        import json
        import time

        from triton import knobs

        def _log_compile(*, src, metadata, metadata_group, times, cache_hit):
            name = getattr(src, "name", None) or (metadata or {}).get("name", "?")
            line = {"t": time.time(), "pid": os.getpid(), "name": name, "s": times.total / 1e6,
                    "cache_hit": bool(cache_hit)}
            with open(os.environ["M3_COMPILE_LOG"], "a") as f:
                f.write(json.dumps(line) + "\n")

        knobs.compilation.listener = _log_compile
    except Exception as e:  # noqa: BLE001 -- a measurement aid must never stop a process from starting
        print(f"compile_listener: not installed ({e!r})")
