"""C-STORE command sets no conformant sender makes, sent over a raw socket.

Each one lacks an element PS3.7 9.3.1.1 requires (the command field, the
data set type, a UID the file meta needs) or is empty. The node must answer
as pynetdicom answers a message it cannot decode, an A-ABORT, and end the
association: no thread of it may die on the way (a dead reader thread leaves
the connection and its association slot held), nothing may be stored and no
spool file left.
"""

from __future__ import annotations

import struct
import threading
import time

import pytest

from tests import rawpdu
from tests.ctfactory import series
from tests.test_streaming_receive import (
    COMMAND_LAST,
    DATA_LAST,
    associated,
    data_set_bytes,
    node,  # noqa: F401  (the fixture)
    spool_leftovers,
)

pytestmark = pytest.mark.peers

A_ABORT = 0x07


def element(number: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, number, len(value)) + value


def uid(value: object) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\0" if len(raw) % 2 else raw


def command_without(ds, left_out: int | None) -> bytes:
    """A C-STORE-RQ command set for ``ds`` with element ``left_out`` missing."""
    elements = {
        0x0002: uid(ds.SOPClassUID),
        0x0100: struct.pack("<H", 0x0001),
        0x0110: struct.pack("<H", 1),
        0x0700: struct.pack("<H", 0),
        0x0800: struct.pack("<H", 0x0001),
        0x1000: uid(ds.SOPInstanceUID),
    }
    elements.pop(left_out, None)
    body = b"".join(element(number, value) for number, value in sorted(elements.items()))
    return element(0x0000, struct.pack("<I", len(body))) + body


def assert_aborted(sock, receiver) -> None:
    """The node answered with an A-ABORT and let the association go."""
    pdu_type, _ = rawpdu.read_pdu(sock)
    sock.close()
    assert pdu_type == A_ABORT
    deadline = time.monotonic() + 10
    while receiver.active_associations() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receiver.active_associations() == 0


@pytest.fixture
def thread_deaths(monkeypatch):
    died: list[str] = []

    def hook(args: threading.ExceptHookArgs) -> None:
        died.append(f"{args.thread.name if args.thread else '?'}: {args.exc_type.__name__}")

    monkeypatch.setattr(threading, "excepthook", hook)
    return died


@pytest.mark.parametrize("left_out", [0x1000, 0x0002, 0x0800, 0x0100, 0x0110, "all"],
                         ids=["no-instance-uid", "no-class-uid", "no-data-set-type",
                              "no-command-field", "no-message-id", "empty"])
def test_command_set_lacking_a_required_element_is_aborted(node, thread_deaths,  # noqa: F811
                                                           left_out):
    receiver, ledger, spool = node
    ds = series(1, size=16)[0]
    command = b"" if left_out == "all" else command_without(ds, left_out)
    sock = associated(receiver.port)
    sock.sendall(rawpdu.p_data((1, COMMAND_LAST, command), (1, DATA_LAST, data_set_bytes(ds))))
    assert_aborted(sock, receiver)
    assert thread_deaths == []
    assert ledger.find_instance(str(ds.SOPInstanceUID)) is None
    assert spool_leftovers(spool) == []


def test_a_abort_in_the_middle_of_a_data_set_leaves_no_file_and_no_row(node,  # noqa: F811
                                                                       thread_deaths):
    from tests.test_streaming_receive import DATA_MORE, command_bytes

    receiver, ledger, spool = node
    ds = series(1, size=256)[0]
    data = data_set_bytes(ds)
    sock = associated(receiver.port)
    sock.sendall(rawpdu.p_data((1, COMMAND_LAST, command_bytes(ds)), (1, DATA_MORE, data[:8000])))
    deadline = time.monotonic() + 10
    while not spool_leftovers(spool) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert spool_leftovers(spool), "the data set is written to the spool as it arrives"
    sock.sendall(rawpdu.pdu_header(A_ABORT, 4) + bytes(4))  # A-ABORT from the sender
    deadline = time.monotonic() + 10
    while (spool_leftovers(spool) or receiver.active_associations()) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    sock.close()
    assert spool_leftovers(spool) == []
    assert receiver.active_associations() == 0
    assert ledger.find_instance(str(ds.SOPInstanceUID)) is None
    assert thread_deaths == []


def test_a_command_in_the_middle_of_a_data_set_aborts(node, thread_deaths):  # noqa: F811
    # PS3.8 E.2: a message's fragments follow each other; a new command before
    # the last data set fragment cannot belong to either message.
    from tests.test_streaming_receive import DATA_MORE, command_bytes

    receiver, ledger, spool = node
    first, second = series(2, size=32)
    sock = associated(receiver.port)
    sock.sendall(rawpdu.p_data((1, COMMAND_LAST, command_bytes(first, 1)),
                               (1, DATA_MORE, data_set_bytes(first)[:500])))
    sock.sendall(rawpdu.p_data((1, COMMAND_LAST, command_bytes(second, 2)),
                               (1, DATA_LAST, data_set_bytes(second))))
    assert_aborted(sock, receiver)
    for ds in (first, second):
        assert ledger.find_instance(str(ds.SOPInstanceUID)) is None
    assert spool_leftovers(spool) == []
    assert thread_deaths == []
