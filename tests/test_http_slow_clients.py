"""Slow and idle HTTP clients against the running daemon: a bounded pool of threads and a
deadline per connection (the daemon is a subprocess; its threads are read from /proc)."""

from __future__ import annotations

import os
import socket
import time

import pytest

from tests.conftest import write_config
from tests.daemon import Daemon, wait_until
from tests.test_http_daemon import get

THREADS, TIMEOUT_S = 4, 1.0

pytestmark = pytest.mark.peers  # the daemon, as a subprocess


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except (TimeoutError, BlockingIOError):
        return False


def test_200_slow_clients_hold_a_bounded_pool_and_are_cut_at_the_deadline(tmp_path):
    config = write_config(tmp_path, http={"threads": THREADS, "timeout_s": TIMEOUT_S})
    node = Daemon(config, 0, tmp_path / "node.log").start()
    http_port = node.http_port
    clients: list[socket.socket] = []
    try:
        wait_until(lambda: get(http_port, "/healthz")[0] == 200, 30, "healthy")
        before = threads_of(node.proc.pid)
        for i in range(200):
            sock = socket.create_connection(("127.0.0.1", http_port), timeout=5)
            if i % 2:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x")  # never finished
            clients.append(sock)
        connected = time.monotonic()
        time.sleep(0.3)
        during = threads_of(node.proc.pid)
        # Every slow client is closed by the node by its deadline, or at once when
        # every slot was taken; none is left holding a thread.
        for sock in clients:
            sock.settimeout(max(connected + TIMEOUT_S + 3 - time.monotonic(), 0.05))
            assert closed_by_peer(sock), "a slow client was still open after the deadline"
        cut_after = time.monotonic() - connected
        # A client sending one byte at a time is cut at its deadline too.
        drip = socket.create_connection(("127.0.0.1", http_port), timeout=5)
        started, dripped = time.monotonic(), 0
        drip.settimeout(0.2)
        try:
            while time.monotonic() - started < TIMEOUT_S + 5:
                drip.sendall(b"G")
                dripped += 1
                if closed_by_peer(drip):
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        drip_cut = time.monotonic() - started
        code = get(http_port, "/healthz")[0]
        after = threads_of(node.proc.pid)
    finally:
        for sock in clients:
            sock.close()
        assert node.stop() == 0, node.log()
    print(f"threads before {before}, with 200 slow clients {during}, after {after}; all cut "
          f"{cut_after:.2f} s after connecting; drip cut after {drip_cut:.2f} s")
    assert during - before <= THREADS, (before, during)
    assert after - before <= THREADS
    assert cut_after < TIMEOUT_S + 3
    assert drip_cut < TIMEOUT_S + 2 and dripped >= 3
    assert code == 200
