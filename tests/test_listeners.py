"""A peer or daemon a test starts counts as started only when its own process listens:
a port another process holds (another suite's node or peer that got the same number)
is refused at once, naming that process, never taken for the one started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests import peers
from tests.conftest import write_config
from tests.ctfactory import encode, series
from tests.daemon import Daemon
from tests.listeners import (
    NotListening,
    PortTaken,
    command_line,
    owns_listener,
    port_owners,
    wait_for_own_listener,
)
from tests.peers import free_port, storescp, storescu

pytestmark = pytest.mark.peers  # listeners, the daemon and storescp

HOLDER = f"PID {os.getpid()} "  # the foreign listener below is this test process's


@contextmanager
def foreign_listener() -> Iterator[int]:
    """A plain socket of this test process listening on a port: someone else's port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def test_a_daemon_on_a_port_another_process_holds_is_refused_naming_the_holder(tmp_path):
    with foreign_listener() as port:
        config = write_config(tmp_path, node={"port": port})
        daemon = Daemon(config, port, tmp_path / "daemon.log")
        started = time.monotonic()
        with pytest.raises(AssertionError, match=f"port {port} is held by {HOLDER}"):
            daemon.start()
        took = time.monotonic() - started
    assert daemon.proc is not None and daemon.proc.poll() is not None  # not left running
    assert took < 10, f"refused after {took:.1f} s"


def test_storescp_on_a_port_another_process_holds_is_refused_naming_the_holder(tmp_path):
    with foreign_listener() as port, pytest.raises(
            AssertionError, match=f"port {port} is held by {HOLDER}"), storescp(
            tmp_path / "tps", port=port):
        pass


def test_storescp_whose_picked_port_was_taken_starts_again_on_another(tmp_path, monkeypatch):
    with foreign_listener() as taken:
        picks = iter([taken])  # the first port picked is taken before storescp binds it
        monkeypatch.setattr(peers, "free_port", lambda: next(picks, None) or free_port())
        with storescp(tmp_path / "tps") as port:
            assert port != taken
            assert port_owners(taken) == [os.getpid()]
            (owner,) = port_owners(port)
            assert "storescp" in command_line(owner)


def test_a_daemon_on_port_0_reads_back_the_ports_its_own_process_bound(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    for i, ds in enumerate(series(2)):
        (folder / f"ct{i}.dcm").write_bytes(encode(ds))
    daemon = Daemon(write_config(tmp_path), 0, tmp_path / "daemon.log").start()
    try:
        assert daemon.proc is not None and daemon.port and daemon.http_port
        assert port_owners(daemon.port) == [daemon.proc.pid]
        assert port_owners(daemon.http_port) == [daemon.proc.pid]
        assert storescu(folder, daemon.port).returncode == 0
    finally:
        assert daemon.stop() == 0, daemon.log()
    first = daemon.port
    daemon.start()  # a new start binds again: the port is read back again
    try:
        assert daemon.proc is not None and owns_listener(daemon.proc.pid, daemon.port)
    finally:
        daemon.stop()
    print(f"ports read back: {first}, then {daemon.port}")


def test_the_wait_refuses_a_port_held_by_another_process():
    proc = sleeper()  # holds no socket at all
    try:
        with foreign_listener() as port, pytest.raises(
                PortTaken, match=f"port {port} is held by {HOLDER}.*not by the sleeper "
                                 f"\\(PID {proc.pid}, still running"):
            wait_for_own_listener(proc, port, 30, "the sleeper")
    finally:
        proc.kill()
        proc.wait()


def test_the_wait_accepts_a_listener_a_child_of_the_process_holds():
    listen = ("import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
              "s.listen(); print(s.getsockname()[1], flush=True); time.sleep(60)")
    # bash forks the interpreter (a command follows it): the listener is a grandchild's.
    proc = subprocess.Popen(["bash", "-c", f'"{sys.executable}" -c "{listen}"; exit 0'],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    other = sleeper()
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        wait_for_own_listener(proc, port, 30, "bash")
        assert port_owners(port) != [proc.pid]  # not bash itself: its child
        assert not owns_listener(other.pid, port)
        with pytest.raises(PortTaken, match=f"held by PID {port_owners(port)[0]} "):
            wait_for_own_listener(other, port, 30, "the sleeper")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # bash and its child
        for started in (proc, other):
            started.kill()
            started.wait()


def test_the_wait_reports_an_exit_and_a_timeout():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(NotListening, match="exited with code 3 before listening"):
        wait_for_own_listener(proc, free_port(), 30, "the process")
    idle = sleeper()
    try:
        with pytest.raises(NotListening, match="did not listen on port .* within 0.3 s"):
            wait_for_own_listener(idle, free_port(), 0.3, "the sleeper")
    finally:
        idle.kill()
        idle.wait()
