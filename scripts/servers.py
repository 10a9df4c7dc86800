"""`python -m sglang.launch_server` as a child process, for the GPU scripts and the benchmarks.

Each server gets its own process group, so stopping it also stops its scheduler and detokenizer.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def post(url: str, body: dict | None = None, timeout: float = 600):
    """POST `body` as JSON (GET when None); the reply parsed as JSON when it is JSON."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
    except urllib.error.HTTPError as exc:  # the server's reason, not just "400: Bad Request" (session 19 lost a profile)
        exc.body = exc.read()  # kept: the response can be read only once (callers read the body from here)
        exc.msg = f"{exc.msg}: {exc.body[:2000].decode(errors='replace')}"
        raise
    return json.loads(raw) if raw.strip().startswith((b"{", b"[")) else raw.decode()


def _interrupt_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt in this (main-thread) process, so that a step's time limit (gpu_round.sh's
    `timeout`) unwinds through the caller's `finally: server.stop()`: the server runs in its own session and would
    otherwise outlive its caller and keep the GPU's memory from the next step. KeyboardInterrupt, not SystemExit:
    pytest (whose fixtures start servers too) treats SystemExit inside a test as that test's failure and goes on,
    so `timeout N pytest ...` would no longer stop it; an interrupt stops the session and still runs teardown."""
    import threading

    def interrupt(*_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the unwinding short
        raise KeyboardInterrupt("SIGTERM")

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt)


def _require_free_port(port: int, name: str) -> None:
    """Raise RuntimeError when something already listens on 127.0.0.1:`port`. A server left running by an earlier,
    killed call (a device call past its limit is killed without unwinding) would otherwise answer /health_generate
    for the one being launched, whose own launch then fails on the port: session 12's first e2e run of ours measured
    the in-tree left from the call before."""
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"{name}: port {port} already in use (a server left from an earlier run? on a device "
                               f"host: pkill -f '^[^ ]*python[^ ]* -m sglang.launch_server')")


class Server:
    def __init__(self, name: str, model_path: Path, flags, *, log_dir: Path, port: int, env: dict | None = None):
        _interrupt_on_sigterm()
        # Parallel lanes of one host (scripts/gpu_round.sh runs one per GPU) use disjoint port ranges.
        port += 1000 * int(os.environ.get("SGLANG_M3_PORT_LANE", "0"))
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        _require_free_port(port, name)
        self.log_path = Path(log_dir) / f"server_{name}.log"
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--port", str(port),
               *flags]
        self.t0 = time.time()
        with open(self.log_path, "w") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})}, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def listening(self) -> bool:
        """Whether this server's own log says it listens on its port (uvicorn's "Uvicorn running on" line, logged
        at SGLang's default log level): until then a /health_generate answer may come from another process (a
        leftover still starting when the port was checked)."""
        return re.search(rf"Uvicorn running on http://\S+:{self.port}\b", self.log()) is not None

    def bind_failed(self) -> bool:
        """Whether uvicorn logged that it could not bind this server's port. SGLang then neither listens nor exits
        (it waits in "application shutdown"), so without this check `wait` would sit out its whole timeout: CI's
        stop 32 lost 600 s that way when another process took the port between `_require_free_port` and the bind."""
        return re.search(rf"error while attempting to bind on address \S+ {self.port}\): address already in use",
                         self.log()) is not None

    def wait(self, timeout: float = 900) -> "Server":
        """Until /health_generate answers (a real forward pass) and `listening()`; sets `startup_s`.

        Raises:
            RuntimeError: the server exited, or could not bind its port (it is stopped first).
            TimeoutError: neither within `timeout` seconds."""
        while time.time() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if self.bind_failed():
                self.stop()
                raise RuntimeError(f"{self.name}: port {self.port} was taken by another process during start-up "
                                   f"(uvicorn could not bind it):\n{self.log()[-2000:]}")
            try:
                if not self.listening():
                    raise ConnectionError("not listening yet")
                post(self.url + "/health_generate", timeout=30)
                self.startup_s = time.time() - self.t0
                return self
            except Exception:
                time.sleep(2)
        raise TimeoutError(f"{self.name} not ready after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM the server's process group, then SIGKILL what is left of it after 30 s. Waits for the whole group
        (scheduler, detokenizer), not only the launcher: a scheduler still exiting holds the GPU's memory, and the
        next step's server would size its pool without it."""
        pgid = self.proc.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    self.proc.wait(0.5)
                except subprocess.TimeoutExpired:
                    continue
                try:
                    os.killpg(pgid, 0)  # any member left?
                except ProcessLookupError:
                    return
                time.sleep(0.5)


def flush(server: Server, attempts: int = 30) -> None:
    """/flush_cache, retried: SGLang answers 400 while a just-finished request is still leaving the scheduler
    ("Cache not flushed because there are pending requests", seen right after a /generate returned)."""
    for attempt in range(attempts):
        try:
            post(server.url + "/flush_cache")
            return
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5)
