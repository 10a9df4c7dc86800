"""scripts/servers.py, the launcher of every GPU script and benchmark: a server must never be measured in place of
another. Session 12's first e2e call of ours measured the in-tree server that a killed call had left on the port
(ours failed to bind; the leftover answered /health_generate). Oracles: a real listening socket, and a real
child process that exits without listening."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from scripts import servers


def test_a_port_in_use_is_refused_before_launch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"port {port} already in use"):
            servers.Server("x", tmp_path, [], log_dir=tmp_path, port=port)
    servers._require_free_port(port, "x")  # closed again: free


def test_health_counts_only_once_the_servers_own_log_says_it_listens(tmp_path, monkeypatch):
    """A child that never logs uvicorn's line for its port is not ready, even while something answers the health
    probe; it is reported when it exits. The same log with the line for its port makes it ready."""
    answered = []
    monkeypatch.setattr(servers, "post", lambda url, *a, **k: answered.append(url))
    s = servers.Server.__new__(servers.Server)  # its process: a stand-in that only sleeps (then exits)
    s.name, s.port, s.url, s.log_path = "x", 31999, "http://127.0.0.1:31999", tmp_path / "x.log"
    s.log_path.write_text("INFO:     Uvicorn running on http://127.0.0.1:32000 (Press CTRL+C to quit)\n")
    s.proc, s.t0 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)"]), time.time()
    with pytest.raises(RuntimeError, match="exited"):
        s.wait(timeout=30)
    assert answered == [] and not s.listening()  # the log names another port: never probed

    s.log_path.write_text("INFO:     Uvicorn running on http://127.0.0.1:31999 (Press CTRL+C to quit)\n")
    s.proc, s.t0 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"]), time.time()
    try:
        assert s.wait(timeout=30) is s and answered == [s.url + "/health_generate"] and s.startup_s < 30
    finally:
        s.proc.kill()
        s.proc.wait()


def test_a_port_taken_during_start_up_fails_at_once_not_after_the_timeout(tmp_path):
    """uvicorn's bind error for this server's port (its wording in SGLang 0.5.17's log) stops the wait at once and
    stops the server, which would otherwise hang in "application shutdown"; the same error for another port does
    not. Oracle: a real child process that keeps running, and the wall time."""
    s = servers.Server.__new__(servers.Server)
    s.name, s.port, s.url, s.log_path = "x", 31999, "http://127.0.0.1:31999", tmp_path / "x.log"
    s.proc, s.t0 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True), \
        time.time()
    line = "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', {}): address already in use\n"
    s.log_path.write_text(line.format(32000))
    assert not s.bind_failed()
    s.log_path.write_text(line.format(31999))
    t0 = time.time()
    with pytest.raises(RuntimeError, match="port 31999 was taken"):
        s.wait(timeout=120)
    assert time.time() - t0 < 45 and s.proc.poll() is not None  # stopped, well inside the timeout


def test_test_ports_lie_below_the_ephemeral_range_and_are_not_reused():
    """conftest.free_port: CI's stop 32 lost a server whose bind(0) port went to another socket during start-up."""
    from tests.conftest import ephemeral_port_low, free_port

    ports = [free_port() for _ in range(50)]
    low = ephemeral_port_low()
    assert len(set(ports)) == 50 and all(10000 <= p < low for p in ports)
