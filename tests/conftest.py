"""Shared test fixtures: tiny checkpoints and SGLang servers on CPU with the plugin loaded."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CPU_SHIM = REPO / "cpu_shim"


def cpu_env(**extra) -> dict:
    """Environment for SGLang on a CPU-only machine (see README: the sgl_kernel stand-in goes first)."""
    env = dict(os.environ)
    env.update(SGLANG_USE_CPU_ENGINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(CPU_SHIM), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m sglang.launch_server --device cpu` in a subprocess; its log is kept for assertions."""

    def __init__(self, model_path: Path, *flags: str, log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path), "--device", "cpu",
               "--dtype", "float32", "--max-total-tokens", "16384", "--grammar-backend", "llguidance",
               # An idle scheduler otherwise busy-polls a whole core: with two cores, a few idle servers
               # starve the next one's start-up.
               "--sleep-on-idle", "--port", str(self.port), *flags]
        self._log = open(log, "w")
        # Own process group: the scheduler/detokenizer children are stopped with the launcher.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env or cpu_env(),
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health_generate", timeout=30) as r:
                    if r.status == 200:
                        return self
            except Exception:
                time.sleep(2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.flush()

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(20)
                break
            except subprocess.TimeoutExpired:
                continue
        self._log.close()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Factory: write (once per option set) a tiny fp32 checkpoint and return its directory."""
    from sglang_m3.tiny import write_tiny_checkpoint

    cache: dict = {}

    def make(**options) -> Path:
        key = tuple(sorted(options.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("tiny")
            write_tiny_checkpoint(out, dtype="float32", **options)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="module")
def start_server(tmp_path_factory):
    """Factory: start a CPU server (shared per identical arguments within a module, stopped after it)."""
    servers: dict = {}

    def start(model_path: Path, *flags: str, env: dict | None = None, wait: bool = True) -> Server:
        key = (str(model_path), flags)
        if key not in servers or not wait:
            log = tmp_path_factory.mktemp("server") / "server.log"
            server = Server(model_path, *flags, log=log, env=env)
            if not wait:
                return server
            servers[key] = server.wait_ready()
        return servers[key]

    yield start
    for server in servers.values():
        server.stop()
