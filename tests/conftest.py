"""Shared test fixtures: tiny checkpoints and SGLang servers on CPU with the plugin loaded."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from scripts import servers

REPO = Path(__file__).resolve().parents[1]
CPU_SHIM = REPO / "cpu_shim"


def cpu_env(**extra) -> dict:
    """Environment for SGLang on a CPU-only machine (see README: the sgl_kernel stand-in goes first)."""
    env = dict(os.environ)
    env.update(SGLANG_USE_CPU_ENGINE="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(CPU_SHIM), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.update(extra)
    return env


def interpreted_worker(script, flag: str, timeout: float) -> dict:
    """Run `python script flag` under the Triton interpreter (TRITON_INTERPRET=1, CPU) from the repo root and
    return the JSON the worker printed after `@@RESULT@@`; fails the test with the worker's output tail when it
    printed none (crash, timeout of the kernel interpreter)."""
    return script_worker(script, flag, timeout, TRITON_INTERPRET="1")


def script_worker(script, flag: str, timeout: float, **env_overrides: str) -> dict:
    """`interpreted_worker` with this process's environment plus `env_overrides` (compiled Triton by default)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_overrides)
    proc = subprocess.run([sys.executable, str(script), flag], cwd=Path(__file__).resolve().parents[1], env=env,
                          text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULT@@")]
    assert line, f"worker died (rc={proc.returncode}):\n{proc.stdout[-6000:]}"
    return json.loads(line[-1][len("@@RESULT@@"):])


_ports_given: set[int] = set()


def ephemeral_port_low() -> int:
    """The first port of the kernel's ephemeral range (Linux's ip_local_port_range; elsewhere IANA's 49152)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:
        return 49152


def free_port() -> int:
    """A free 127.0.0.1 port below the kernel's ephemeral range, not handed out before in this process.

    Not the ephemeral port that bind(0) gives: the server binds it only after ~15 s of start-up, and in that window
    the kernel may hand the same port to any outgoing connection or to another server's `get_free_port()` (SGLang's
    nccl_port), which is how CI's stop 32 lost a server to "address already in use"."""
    low = ephemeral_port_low()
    for _ in range(1000):
        port = random.randrange(10000, max(low, 10001))
        if port in _ports_given:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _ports_given.add(port)
        return port
    raise RuntimeError(f"no free port in [10000, {low})")


class Server(servers.Server):
    """scripts/servers.py's launcher with the CPU flags the tests use; its log is kept for assertions."""

    def __init__(self, model_path: Path, *flags: str, log_dir: Path, env: dict | None = None):
        cpu_flags = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "16384",
                     "--grammar-backend", "llguidance",
                     # An idle scheduler otherwise busy-polls a whole core: with two cores, a few idle servers
                     # starve the next one's start-up.
                     "--sleep-on-idle"]
        super().__init__("test", model_path, [*cpu_flags, *flags], log_dir=log_dir, port=free_port(),
                         env=env or cpu_env())

    def wait_exit(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout)


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
            server = Server(model_path, *flags, log_dir=tmp_path_factory.mktemp("server"), env=env)
            if not wait:
                return server
            servers[key] = server.wait(timeout=600)
        return servers[key]

    yield start
    for server in servers.values():
        server.stop()
