"""An association's pynetdicom threads sleep while nothing happens, and wake at once when it does.

The peer is a raw socket (no pynetdicom threads on its side), so every
thread measured here is the node's.
"""

from __future__ import annotations

import threading
import time

import pytest
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider

from oncoseg_node.intake.handlers import StoreHandlers
from oncoseg_node.intake.spool import Spool
from oncoseg_node.intake.transport import Receiver
from oncoseg_node.ledger import Ledger
from tests import rawpdu

pytestmark = pytest.mark.peers

A_RELEASE_RQ = bytes([0x05, 0, 0, 0, 0, 4, 0, 0, 0, 0])
A_RELEASE_RP = 0x06
# pynetdicom's own loops wake about 1000 times a second per thread.
MAX_WAKEUPS_PER_S = 100


@pytest.fixture
def receiver(make_config):
    cfg = make_config()
    handlers = StoreHandlers(cfg.node, cfg.series, Spool(cfg.spool_dir), Ledger(cfg.ledger_path))
    started = Receiver(cfg.node, handlers)
    started.start()
    yield started
    started.stop_accepting()


def association_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if isinstance(t, DULServiceProvider | Association) and t.is_alive()]


def wakeups(thread: threading.Thread) -> int:
    """How often the thread has gone to sleep and woken (voluntary context switches)."""
    with open(f"/proc/self/task/{thread.native_id}/status") as fh:
        for line in fh:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def test_idle_association_threads_do_not_poll(receiver):
    sock = rawpdu.connect(receiver.port)
    try:
        sock.sendall(rawpdu.associate_rq())
        assert rawpdu.read_pdu(sock)[0] == 0x02
        deadline = time.monotonic() + 10
        while len(association_threads()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        threads = association_threads()
        # upper-layer and association threads (the node subclasses Association)
        assert {isinstance(t, Association) for t in threads} == {False, True}
        time.sleep(0.2)  # past the negotiation
        before = {t: wakeups(t) for t in threads}
        started = time.monotonic()
        time.sleep(1.0)
        elapsed = time.monotonic() - started
        rates = {f"{type(t).__name__} {t.native_id}": (wakeups(t) - before[t]) / elapsed
                 for t in threads}
        assert all(rate < MAX_WAKEUPS_PER_S for rate in rates.values()), rates
    finally:
        sock.close()


def test_release_of_an_idle_association_is_answered_at_once(receiver):
    sock = rawpdu.connect(receiver.port)
    try:
        sock.sendall(rawpdu.associate_rq())
        assert rawpdu.read_pdu(sock)[0] == 0x02
        time.sleep(0.3)  # both threads are waiting
        started = time.monotonic()
        sock.sendall(A_RELEASE_RQ)
        assert rawpdu.read_pdu(sock)[0] == A_RELEASE_RP
        # One wait of each thread at most (REACTOR_WAIT_S), were a wake-up missed.
        assert time.monotonic() - started < 1.0
    finally:
        sock.close()
