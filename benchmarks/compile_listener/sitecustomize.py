"""Measurement aid for benchmarks/capture_time.py (not part of the package), for every Python process started with
this folder first on PYTHONPATH (the server and its spawned scheduler):

- M3_COMPILE_LOG: one JSON line per Triton compile -- kernel name, seconds, cache hit, wall time, pid -- from
  Triton's compilation listener (``triton.knobs.compilation.listener``, called by ``triton.compile`` with its
  CompileTimes).
- M3_STACK_LOG: a daemon thread samples the main thread's Python stack every M3_STACK_INTERVAL seconds (default
  0.5) and appends {t, pid, stack: innermost 40 frames as "path:line function"}: where the time goes that no
  compile listener sees (nvcc JIT builds, inductor, cuBLAS/NCCL set-up, plain Python).
"""

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

if os.environ.get("M3_STACK_LOG"):
    try:
        import json
        import sys
        import threading
        import time

        def _sample(main_id: int, path: str, interval: float) -> None:
            while True:
                time.sleep(interval)
                frame = sys._current_frames().get(main_id)
                if frame is None:
                    return  # the main thread ended
                stack = []
                while frame is not None and len(stack) < 40:
                    stack.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}")
                    frame = frame.f_back
                with open(path, "a") as f:
                    f.write(json.dumps({"t": time.time(), "pid": os.getpid(), "stack": stack}) + "\n")

        threading.Thread(target=_sample, daemon=True, name="m3-stack-sampler",
                         args=(threading.main_thread().ident, os.environ["M3_STACK_LOG"],
                               float(os.environ.get("M3_STACK_INTERVAL", "0.5")))).start()
    except Exception as e:  # noqa: BLE001
        print(f"stack sampler: not started ({e!r})")
