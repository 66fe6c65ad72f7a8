"""Bounds on what a peer can make the node read: PDU length, time, connections.

pynetdicom's upper layer reads a PDU as ``recv(6)`` for the header, then
``recv(length)`` for the rest, with no deadline, after allocating whatever
length the header declares. :class:`BoundedSocket` enforces the node's
limits at those two calls:

- a declared length above the limit for its PDU type aborts the connection
  before anything is allocated (P-DATA-TF: the maximum the node offered in
  negotiation; every other PDU: :data:`NON_DATA_PDU_CAP`);
- the rest of a PDU is read in chunks as it arrives, so a header that
  announces more than is ever sent costs only what was sent;
- a PDU must arrive whole within its deadline (the ACSE timeout before the
  association is established, the network timeout after), so a stalled or
  half-sent PDU frees its association slot;
- an A-ASSOCIATE-RQ that pynetdicom cannot turn into a request (even
  presentation context IDs, for one) is answered with an A-ABORT instead of
  killing the connection's thread;
- a peer address holding ``max_per_peer`` connections that have sent data is
  refused more; connections that sent nothing do not count (the state
  machine's ARTIM timer closes them at the ACSE timeout).

A refused or timed-out read returns fewer bytes than asked for, which the
upper layer treats as the transport closing (no exception, no traceback);
the reason is logged here once.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass

import structlog
from pynetdicom.pdu import A_ASSOCIATE_RQ as AssociateRequestPDU
from pynetdicom.transport import AssociationSocket

from oncoseg_node.intake.reactor import REACTOR_WAIT_S, Wakeup

log = structlog.get_logger("oncoseg_node.receiver")

PDU_HEADER_BYTES = 6
ASSOCIATE_RQ = 0x01
ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
ABORT = 0x07
KNOWN_PDU_TYPES = range(0x01, 0x08)
# An A-ASSOCIATE-RQ offering the 128 presentation contexts PS3.8 allows, each
# with a dozen transfer syntaxes, stays well under 256 KiB; release and abort
# PDUs are 10 bytes. Anything larger outside P-DATA is not a DICOM peer.
NON_DATA_PDU_CAP = 1024 * 1024
# Buffers grow by at most this much at a time, as the bytes actually arrive.
READ_CHUNK = 256 * 1024
# A closed connection's upper-layer thread checks this often whether its
# association has stopped it (pynetdicom's own delay).
CLOSED_POLL_S = 0.001

# A-ABORT source 2: service provider (PS3.8 9.3.8).
ABORT_SOURCE_PROVIDER = 2
ABORT_REASON_UNEXPECTED_PDU = 2
ABORT_REASON_INVALID_PARAMETER = 6
# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected-transient by the service provider
# (presentation related function), local limit exceeded.
REJECT_TRANSIENT = 2
REJECT_SOURCE_PROVIDER_PRESENTATION = 3
REJECT_LOCAL_LIMIT_EXCEEDED = 2


def abort_pdu(reason: int) -> bytes:
    return struct.pack(">BBIBBBB", ABORT, 0, 4, 0, 0, ABORT_SOURCE_PROVIDER, reason)


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return struct.pack(">BBIBBBB", ASSOCIATE_RJ, 0, 4, 0, result, source, reason)


@dataclass(frozen=True)
class WireLimits:
    """The listener's limits, from ``node`` in the config."""

    max_pdu: int
    acse_timeout_s: float
    network_timeout_s: float
    max_per_peer: int


class PeerCounter:
    """Counts, per peer address, live connections that have sent data.

    The count is taken from the sockets themselves (a connection stops
    counting when it is refused, times out, closes or its thread ends), so a
    path that forgets to decrement cannot leak slots.
    """

    def __init__(self, max_per_peer: int) -> None:
        self.max_per_peer = max_per_peer
        self.lock = threading.Lock()
        self._sockets: set[BoundedSocket] = set()

    def admit(self, sock: BoundedSocket) -> bool:
        """Count ``sock`` unless its peer address already has the maximum."""
        with self.lock:
            live = {s for s in self._sockets if s.counts()}
            self._sockets = live
            same_peer = sum(1 for s in live if s.peer == sock.peer)
            if same_peer >= self.max_per_peer:
                return False
            live.add(sock)
            return True

    def count(self, peer: str) -> int:
        with self.lock:
            return sum(1 for s in self._sockets if s.counts() and s.peer == peer)


class BoundedSocket(AssociationSocket):
    """An association's socket that reads within the node's :class:`WireLimits`.

    Installed on a socket pynetdicom has already made (see
    ``NodeRequestHandler``), then given its limits with :meth:`bind_limits`.
    """

    limits: WireLimits
    peers: PeerCounter
    peer: str
    _deadline: float
    _pdu_type: int
    _sent_data: bool
    _finished: bool
    wakeup: Wakeup

    def bind_limits(self, limits: WireLimits, peers: PeerCounter, peer: str,
                    wakeup: Wakeup) -> None:
        """``wakeup`` is polled beside the socket (see ``reactor``); closed with it."""
        self.wakeup = wakeup
        self.limits = limits
        self.peers = peers
        self.peer = peer
        self._deadline = 0.0
        self._pdu_type = 0
        self._sent_data = False
        self._finished = False

    def counts(self) -> bool:
        """Whether this connection holds one of its peer's slots."""
        thread = self._assoc
        return self._sent_data and not self._finished and thread.is_alive()

    @property
    def ready(self) -> bool:
        """Whether data can be read; blocks until data, a queued send or a short timeout.

        The DUL thread calls this whenever it has nothing queued to send, so
        waiting here (on the socket and the association's wake-up, see
        ``reactor``) replaces its millisecond sleep. poll(), so descriptors
        above 1023 work too.
        """
        sock = self.socket
        if sock is None or self._is_connected is False:
            # Closed: the DUL thread loops until its association stops it.
            time.sleep(CLOSED_POLL_S)
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        poller = select.poll()
        wake_fd = self.wakeup.fd
        try:
            poller.register(sock, select.POLLIN | select.POLLPRI)
            if wake_fd is not None:
                poller.register(wake_fd, select.POLLIN)
            events = poller.poll(int(REACTOR_WAIT_S * 1000))
        except (OSError, ValueError):
            self.event_queue.put("Evt17")
            return False
        readable = False
        for fd, _mask in events:
            if fd == wake_fd:
                self.wakeup.drain()
            else:
                readable = True
        return readable

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes == PDU_HEADER_BYTES and self._pdu_type == 0:
            return self._recv_header()
        return self._recv_body(nr_bytes)

    def close(self) -> None:
        self._finished = True
        super().close()
        self.wakeup.close()

    # -- the two reads of a PDU ------------------------------------------------

    def _recv_header(self) -> bytearray:
        if not self._sent_data:
            if not self.peers.admit(self):
                self._refuse_peer_limit()
                return bytearray()
            self._sent_data = True
        timeout = (self.limits.network_timeout_s if self._assoc.is_established
                   else self.limits.acse_timeout_s)
        self._deadline = time.monotonic() + timeout
        header = self._read(PDU_HEADER_BYTES)
        if len(header) < PDU_HEADER_BYTES:
            return header
        pdu_type, _, length = struct.unpack(">BBI", header)
        cap = self.limits.max_pdu if pdu_type == P_DATA_TF else NON_DATA_PDU_CAP
        if length > cap:
            log.warning("connection_aborted_pdu_too_long", peer=self.peer, pdu_type=pdu_type,
                        declared_bytes=length, limit_bytes=cap)
            self._abort(ABORT_REASON_INVALID_PARAMETER)
            # The upper layer reads the body next: it gets nothing and sees a
            # closed transport.
            self._pdu_type = -1
            return header
        if pdu_type in KNOWN_PDU_TYPES:  # the upper layer reads no body for others
            self._pdu_type = pdu_type
        return header

    def _recv_body(self, nr_bytes: int) -> bytearray:
        pdu_type, self._pdu_type = self._pdu_type, 0
        if pdu_type == -1:
            return bytearray()
        body = self._read(nr_bytes)
        if len(body) < nr_bytes:
            return body
        if pdu_type == ASSOCIATE_RQ:
            problem = self._associate_rq_problem(body)
            if problem is not None:
                log.warning("association_aborted_malformed_request", peer=self.peer,
                            error=problem)
                self._abort(ABORT_REASON_INVALID_PARAMETER)
                return bytearray()
        return body

    def _read(self, count: int) -> bytearray:
        """Up to ``count`` bytes by the PDU's deadline; fewer means the read ended."""
        sock = self.socket
        assert sock is not None
        buffer = bytearray(min(count, READ_CHUNK))
        received = 0
        while received < count:
            if received == len(buffer):
                buffer.extend(bytes(min(count - received, READ_CHUNK)))
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                return self._timed_out(buffer, received, count)
            try:
                sock.settimeout(remaining)
                got = sock.recv_into(memoryview(buffer)[received:], len(buffer) - received)
            except TimeoutError:
                return self._timed_out(buffer, received, count)
            except OSError:
                self._finished = True
                return buffer[:received]
            if got == 0:  # the peer closed: return what arrived, as the base does
                self._finished = True
                return buffer[:received]
            received += got
        return buffer

    def _timed_out(self, buffer: bytearray, received: int, count: int) -> bytearray:
        established = self._assoc.is_established
        log.warning("connection_closed_read_timeout", peer=self.peer,
                    received_bytes=received, expected_bytes=count,
                    timeout_s=(self.limits.network_timeout_s if established
                               else self.limits.acse_timeout_s),
                    phase="association" if established else "negotiation")
        self._abort(ABORT_REASON_UNEXPECTED_PDU if established
                    else ABORT_REASON_INVALID_PARAMETER)
        return buffer[:received]

    # -- refusals ----------------------------------------------------------------

    def _associate_rq_problem(self, body: bytearray) -> str | None:
        """Why pynetdicom could not turn this A-ASSOCIATE-RQ into a request, if so."""
        pdu = AssociateRequestPDU()
        try:
            pdu.decode(bytes(struct.pack(">BBI", ASSOCIATE_RQ, 0, len(body)) + body))
            for item in pdu.presentation_context:
                context_id = item.presentation_context_id
                if context_id is None or not (1 <= context_id <= 255 and context_id % 2):
                    return f"presentation context ID {context_id} is not odd 1-255"
            pdu.to_primitive()
        except Exception as exc:  # any failure here would kill the state machine
            return f"{type(exc).__name__}: {exc}"
        return None

    def _refuse_peer_limit(self) -> None:
        log.warning("association_refused_peer_limit", peer=self.peer,
                    limit=self.peers.max_per_peer)
        self._drain_available()
        self._send_quietly(reject_pdu(REJECT_TRANSIENT, REJECT_SOURCE_PROVIDER_PRESENTATION,
                                      REJECT_LOCAL_LIMIT_EXCEEDED))
        self._shutdown()

    def _abort(self, reason: int) -> None:
        self._send_quietly(abort_pdu(reason))
        self._shutdown()

    def _drain_available(self) -> None:
        """Read what already arrived, so closing sends FIN rather than RST."""
        sock = self.socket
        if sock is None:
            return
        try:
            sock.setblocking(False)
            drained = 0
            while drained <= NON_DATA_PDU_CAP:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        except OSError:
            pass

    def _send_quietly(self, data: bytes) -> None:
        sock = self.socket
        if sock is None:
            return
        try:
            sock.settimeout(1.0)
            sock.sendall(data)
        except OSError:
            pass

    def _shutdown(self) -> None:
        """Stop the connection now; pynetdicom closes the descriptor as it ends."""
        self._finished = True
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

