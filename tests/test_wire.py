"""The listener against hostile and broken senders: PDU bounds, read deadlines, caps.

Each hostile sender is a raw TCP socket speaking hand-built PDUs; each test
then checks that a normal scanner (pynetdicom SCU) still stores.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from contextlib import ExitStack

import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from oncoseg_node.dicom import status
from oncoseg_node.intake import wire
from oncoseg_node.intake.handlers import StoreHandlers
from oncoseg_node.intake.spool import Spool
from oncoseg_node.intake.transport import FD_RESERVE, Receiver
from oncoseg_node.ledger import Ledger
from tests import rawpdu
from tests.ctfactory import encode, series
from tests.peers import storescu

pytestmark = pytest.mark.peers

TIMEOUT_S = 2.0


@pytest.fixture
def node(make_config):
    started: list[Receiver] = []

    def start(**node_overrides):
        overrides = {"acse_timeout_s": TIMEOUT_S, "network_timeout_s": TIMEOUT_S,
                     **node_overrides}
        cfg = make_config(node=overrides)
        ledger = Ledger(cfg.ledger_path)
        handlers = StoreHandlers(cfg.node, cfg.series, Spool(cfg.spool_dir), ledger)
        receiver = Receiver(cfg.node, handlers)
        receiver.start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop_accepting()


def store_one(port: int, source: str = "127.0.0.1") -> int | None:
    """A normal scanner's C-STORE of one slice: its status, or None if not associated."""
    ae = AE(ae_title="CTSIM")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", port, ae_title="ONCOSEG", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(series(1)[0]).Status)
    finally:
        assoc.release()


def rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def established(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A raw connection with an accepted association (A-ASSOCIATE-AC read)."""
    sock = rawpdu.connect(port, source=source)
    sock.sendall(rawpdu.associate_rq())
    pdu_type, _ = rawpdu.read_pdu(sock)
    assert pdu_type == 0x02, "association not accepted"
    return sock


@pytest.mark.parametrize("pdu_type", [0x01, 0x04])
def test_huge_pdu_header_is_aborted_without_allocating(node, pdu_type):
    receiver = node()
    before = rss_bytes()
    with ExitStack() as stack:
        for _ in range(3):
            sock = stack.enter_context(rawpdu.connect(receiver.port))
            sock.sendall(rawpdu.pdu_header(pdu_type, 0xFFFFFFFF) + b"\0" * 100)
            reply, body = rawpdu.read_pdu(sock)
            assert (reply, body[2:]) == (wire.ABORT, bytes([wire.ABORT_SOURCE_PROVIDER,
                                                            wire.ABORT_REASON_INVALID_PARAMETER]))
            assert rawpdu.closed_within(sock, 1.0) is not None
    assert rss_bytes() - before < 50 * 1024 * 1024
    assert store_one(receiver.port) == status.SUCCESS


def test_p_data_longer_than_offered_maximum_aborts_the_association(node):
    receiver = node(max_pdu=131072)
    sock = established(receiver.port)
    sock.sendall(rawpdu.pdu_header(0x04, 131072 + 1))
    reply, _ = rawpdu.read_pdu(sock)
    assert reply == wire.ABORT
    assert rawpdu.closed_within(sock, 1.0) is not None
    sock.close()


def test_half_sent_request_is_closed_at_the_acse_timeout(node):
    receiver = node()
    sock = rawpdu.connect(receiver.port)
    sock.sendall(rawpdu.associate_rq()[:16])
    closed_after = rawpdu.closed_within(sock, TIMEOUT_S + 5)
    sock.close()
    assert closed_after is not None, "a half-sent A-ASSOCIATE-RQ was never timed out"
    assert closed_after >= TIMEOUT_S * 0.8


def test_connection_that_sent_nothing_is_closed_at_the_acse_timeout(node):
    receiver = node()
    sock = rawpdu.connect(receiver.port)
    closed_after = rawpdu.closed_within(sock, TIMEOUT_S + 5)
    sock.close()
    assert closed_after is not None and closed_after >= TIMEOUT_S * 0.8


def test_stalled_p_data_frees_its_slot_at_the_network_timeout(node):
    receiver = node(max_associations=2)
    stalled = [established(receiver.port) for _ in range(2)]
    started = time.monotonic()
    for sock in stalled:
        sock.sendall(rawpdu.pdu_header(0x04, 1000) + b"\0" * 10)
    time.sleep(0.3)
    assert store_one(receiver.port) is None, "the limit should be reached"
    stored = None
    while stored is None and time.monotonic() - started < TIMEOUT_S + 5:
        time.sleep(0.2)
        stored = store_one(receiver.port)
    assert stored == status.SUCCESS
    assert time.monotonic() - started < TIMEOUT_S + 5
    for sock in stalled:
        assert rawpdu.closed_within(sock, 1.0) is not None
        sock.close()


def test_per_peer_cap_refuses_one_address_not_the_others(node):
    receiver = node(max_associations_per_peer=2)
    with ExitStack() as stack:
        for _ in range(2):  # two half-sent requests from one address hold its slots
            sock = stack.enter_context(rawpdu.connect(receiver.port, source="127.0.0.2"))
            sock.sendall(rawpdu.associate_rq()[:16])
        time.sleep(0.3)
        third = stack.enter_context(rawpdu.connect(receiver.port, source="127.0.0.2"))
        third.sendall(rawpdu.associate_rq())
        reply, body = rawpdu.read_pdu(third)
        assert reply == wire.ASSOCIATE_RJ
        assert tuple(body[1:4]) == (wire.REJECT_TRANSIENT, wire.REJECT_SOURCE_PROVIDER_PRESENTATION,
                                    wire.REJECT_LOCAL_LIMIT_EXCEEDED)
        assert store_one(receiver.port, source="127.0.0.1") == status.SUCCESS


def test_connections_that_sent_nothing_count_against_no_cap(node):
    receiver = node(max_associations=2, max_associations_per_peer=2)
    with ExitStack() as stack:
        for _ in range(20):
            stack.enter_context(rawpdu.connect(receiver.port))
        time.sleep(0.3)
        started = time.monotonic()
        assert store_one(receiver.port) == status.SUCCESS
        assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("context_ids", [(2,), (1, 4), (0,)])
def test_even_presentation_context_ids_get_an_abort_not_a_dead_thread(node, context_ids):
    receiver = node()
    sock = rawpdu.connect(receiver.port)
    sock.sendall(rawpdu.associate_rq(context_ids=context_ids))
    reply, body = rawpdu.read_pdu(sock)
    assert reply == wire.ABORT and body[3] == wire.ABORT_REASON_INVALID_PARAMETER
    assert rawpdu.closed_within(sock, 1.0) is not None
    sock.close()
    assert store_one(receiver.port) == status.SUCCESS
    # Every association thread, the refused one's included, ends.
    deadline = time.monotonic() + TIMEOUT_S + 5
    while receiver.server.active_associations and time.monotonic() < deadline:
        time.sleep(0.1)
    assert receiver.server.active_associations == []


def test_descriptors_above_1023_are_served(node, tmp_path):
    """select() cannot watch a descriptor above 1023; the node must still serve it."""
    receiver = node()
    path = tmp_path / "slice.dcm"
    path.write_bytes(encode(series(1)[0]))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200 + FD_RESERVE:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    filler = [os.open("/dev/null", os.O_RDONLY) for _ in range(1100)]
    try:
        assert min(filler) < 1024 < max(filler)
        # storescu, not an SCU in this process: pynetdicom's own requestor
        # socket would be numbered above 1023 too.
        proc = storescu([path], receiver.port)
        assert proc.returncode == 0, proc.stderr
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_connections_near_the_descriptor_limit_are_refused_then_served_again(node):
    receiver = node()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open("/dev/null", os.O_RDONLY)
    os.close(probe)
    # The next accepted socket gets a number near ``probe``: put the limit
    # just under it plus the reserve, so the listener must refuse.
    resource.setrlimit(resource.RLIMIT_NOFILE, (probe + FD_RESERVE + 1, hard))
    try:
        refused = rawpdu.connect(receiver.port)
        refused.sendall(rawpdu.associate_rq())
        assert rawpdu.read_pdu(refused) == (0, b"")
        refused.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert store_one(receiver.port) == status.SUCCESS



def test_a_burst_of_connections_is_accepted_at_once(node):
    """A listen backlog of socketserver's default 5 drops SYNs in a burst (1 s retransmits)."""
    receiver = node()
    started = time.monotonic()
    with ExitStack() as stack:
        for i in range(100):
            stack.enter_context(rawpdu.connect(receiver.port, source=f"127.0.0.{2 + i}"))
        elapsed = time.monotonic() - started
    assert elapsed < 3.0


def test_per_peer_cap_must_be_positive(make_config):
    from oncoseg_node.errors import ConfigError

    with pytest.raises(ConfigError, match="node.max_associations_per_peer: 0"):
        make_config(node={"max_associations_per_peer": 0})
