"""sd_notify with the real protocol: the test owns the unix datagram socket systemd would.

The daemon runs as a subprocess with ``NOTIFY_SOCKET`` (and ``WATCHDOG_USEC``)
pointing at the test's socket, as systemd starts a ``Type=notify`` unit.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from oncoseg_node.config import load_config
from oncoseg_node.ops.notify import Notifier
from tests.conftest import write_config
from tests.listeners import owns_listener
from tests.peers import free_port

pytestmark = pytest.mark.peers

WATCHDOG_USEC = 1_000_000  # pinged every 0.5 s


@contextmanager
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket under a short path (sun_path holds 107 bytes)."""
    directory = tempfile.mkdtemp(prefix="sdn")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(directory)


def receive(sock: socket.socket, timeout: float) -> dict[str, str] | None:
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return None
    return dict(line.split("=", 1) for line in data.decode().splitlines())


def wait_for(sock: socket.socket, key: str, timeout: float) -> tuple[dict[str, str], float]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = receive(sock, left)
        if message is not None and key in message:
            return message, time.monotonic()
    raise AssertionError(f"no {key} within {timeout} s")


class NotifiedDaemon:
    """``oncoseg-node run`` with the test's notify socket in its environment."""

    def __init__(self, tmp_path: Path, notify_path: str, watchdog_usec: int | None) -> None:
        self.port, self.http_port = free_port(), free_port()
        self.config_path = write_config(tmp_path, node={"port": self.port},
                                        http={"port": self.http_port},
                                        series={"quiet_period_s": 30})
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NOTIFY_SOCKET": notify_path}
        env.pop("WATCHDOG_PID", None)
        if watchdog_usec is None:
            env.pop("WATCHDOG_USEC", None)
        else:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self.log_path = tmp_path / "daemon.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oncoseg_node.cli", "run", "--config", str(self.config_path)],
            stdout=self.log_path.open("ab"), stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=90)


@pytest.fixture
def daemon_with_socket(tmp_path):
    started: list[NotifiedDaemon] = []
    with notify_socket() as (sock, path):
        def start(watchdog_usec: int | None = None) -> NotifiedDaemon:
            started.append(NotifiedDaemon(tmp_path, path, watchdog_usec))
            return started[-1]
        yield sock, start
        for daemon in started:
            if daemon.proc.poll() is None:
                daemon.proc.kill()
                daemon.proc.wait()


def test_ready_is_sent_only_once_the_listener_is_bound_and_the_ledger_open(daemon_with_socket):
    sock, start = daemon_with_socket
    daemon = start()
    message, _ = wait_for(sock, "READY", timeout=60)
    # At the instant READY=1 arrives, the node's own process listens on both ports.
    assert owns_listener(daemon.proc.pid, daemon.port)
    assert owns_listener(daemon.proc.pid, daemon.http_port)
    assert load_config(daemon.config_path).ledger_path.is_file()
    assert message["READY"] == "1"
    assert f":{daemon.port}" in message["STATUS"] and f":{daemon.http_port}" in message["STATUS"]
    assert daemon.stop() == 0
    assert "STOPPING" in wait_for(sock, "STOPPING", timeout=5)[0]


def test_no_watchdog_pings_without_watchdog_usec(daemon_with_socket):
    sock, start = daemon_with_socket
    daemon = start(watchdog_usec=None)
    wait_for(sock, "READY", timeout=60)
    assert receive(sock, 2.0) is None
    assert daemon.stop() == 0


def test_watchdog_is_petted_while_the_node_makes_progress_and_not_while_stuck(
        daemon_with_socket):
    sock, start = daemon_with_socket
    daemon = start(watchdog_usec=WATCHDOG_USEC)
    wait_for(sock, "READY", timeout=60)
    pings = []
    deadline = time.monotonic() + 3
    while (message := receive(sock, max(deadline - time.monotonic(), 0.01))) is not None:
        pings.append(message)
    assert sum("WATCHDOG" in m for m in pings) >= 4  # every 0.5 s or more often
    # Another process holds the ledger's write lock: the worker cannot claim,
    # the main loop's ledger check cannot complete, so systemd must hear nothing.
    ledger = sqlite3.connect(load_config(daemon.config_path).ledger_path, timeout=30,
                             isolation_level=None)
    ledger.execute("BEGIN IMMEDIATE")
    time.sleep(1.5)  # a check in progress when the lock was taken may still finish
    while receive(sock, 0.01) is not None:
        pass
    stuck_until = time.monotonic() + 4
    while (left := stuck_until - time.monotonic()) > 0:
        message = receive(sock, left)
        assert message is None or "WATCHDOG" not in message, "petted while stuck"
    ledger.execute("ROLLBACK")
    ledger.close()
    wait_for(sock, "WATCHDOG", timeout=5)  # progress again: pings resume
    assert daemon.stop() == 0, daemon.log()


def test_notifier_speaks_the_protocol_to_path_and_abstract_sockets():
    with notify_socket() as (sock, path):
        Notifier(path).ready("listening on 0.0.0.0:11112")
        assert receive(sock, 2) == {"READY": "1", "STATUS": "listening on 0.0.0.0:11112"}
    name = f"oncoseg-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract:
        abstract.bind("\0" + name)
        Notifier("@" + name).watchdog()
        assert receive(abstract, 2) == {"WATCHDOG": "1"}
    Notifier("").ready()  # not under systemd: nothing to do, nothing raised


def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.watchdog_interval_s() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert Notifier.watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert Notifier.watchdog_interval_s() is None
