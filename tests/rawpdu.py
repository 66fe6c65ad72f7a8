"""Hand-built PDUs (PS3.8 9.3) for senders that break the standard on purpose.

A conforming library refuses to encode these, so the bytes are built here.
"""

from __future__ import annotations

import socket
import struct
import time

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
IMPLEMENTATION_UID = "1.2.826.0.1.3680043.9.9999.1"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _uid(uid: str) -> bytes:
    return uid.encode("ascii")


def associate_rq(*, called: str = "ONCOSEG", calling: str = "CTSIM",
                 context_ids: tuple[int, ...] = (1,), max_length: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ offering CT Image Storage once per context ID."""
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode()
    body += bytes(32) + _item(0x10, _uid(APPLICATION_CONTEXT))
    for cid in context_ids:
        sub = _item(0x30, _uid(CT_IMAGE_STORAGE)) + _item(0x40, _uid(EXPLICIT_VR_LE))
        body += _item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">I", max_length)) + _item(0x52, _uid(IMPLEMENTATION_UID))
    body += _item(0x50, user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, length)


def connect(port: int, *, source: str = "127.0.0.1", timeout: float = 30.0) -> socket.socket:
    """A TCP connection to the node from ``source`` (any 127.x address on Linux)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_pdu(sock: socket.socket) -> tuple[int, bytes]:
    """The next PDU's type and body; (0, b"") when the node closed the connection."""
    header = _read_exact(sock, 6)
    if len(header) < 6:
        return 0, b""
    pdu_type, _, length = struct.unpack(">BBI", header)
    return pdu_type, _read_exact(sock, length)


def _read_exact(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk
    return data


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the node closed ``sock`` (reading and discarding), or None."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def p_data(*values: tuple[int, int, bytes]) -> bytes:
    """A P-DATA-TF PDU of (context ID, message control header, fragment) values."""
    body = b"".join(struct.pack(">IBB", len(data) + 2, cid, control) + data
                    for cid, control, data in values)
    return pdu_header(0x04, len(body)) + body
