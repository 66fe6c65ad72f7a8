"""The DICOM listener: sockets, TLS, peer and association limits, presentation contexts.

Later stages add their own DICOM services (Storage Commitment reports for the
delivery side) through :class:`ExtraService`, so this module imports nothing
after intake.
"""

from __future__ import annotations

import ipaddress
import resource
import socket
import socketserver
import ssl
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydicom.uid import CTImageStorage
from pynetdicom import AE, evt
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.events import EventHandlerType
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer

from oncoseg_node.config import NodeConfig
from oncoseg_node.intake.handlers import StoreHandlers
from oncoseg_node.intake.headers import CT_SYNTAXES, IGNORED_SOP_CLASSES, UNCOMPRESSED
from oncoseg_node.intake.reactor import Wakeup
from oncoseg_node.intake.reactor import install as install_wakeups
from oncoseg_node.intake.spool import Spool
from oncoseg_node.intake.streaming import install as install_spooling
from oncoseg_node.intake.wire import BoundedSocket, PeerCounter, WireLimits

log = structlog.get_logger("oncoseg_node.receiver")

# Descriptors kept free for the ledger, spool writes, HTTP and logging when
# the DICOM listener refuses connections near the limit.
FD_RESERVE = 64
STANDARD_LOG_HANDLERS = (
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
)


@dataclass(frozen=True)
class ExtraService:
    """A DICOM service a later stage offers on the node's listener.

    ``contexts`` are (abstract syntax, transfer syntaxes, scu_role, scp_role);
    ``bindings`` are pynetdicom (event, handler) pairs.
    """

    contexts: Sequence[tuple[str, Sequence[str], bool | None, bool | None]] = ()
    bindings: Sequence[EventHandlerType] = field(default_factory=list)


class NodeRequestHandler(RequestHandler):
    """Creates each association on a :class:`BoundedSocket` with the server's limits."""

    server: NodeServer

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # The socket object already carries the connection's state (its
        # constructor queued the transport-connection event), so it is
        # specialised in place; BoundedSocket adds its limits, nothing else.
        sock = assoc.dul.socket
        assert sock is not None  # set by the base from the accepted connection
        sock.__class__ = BoundedSocket
        assert isinstance(sock, BoundedSocket)
        wakeup = Wakeup()
        sock.bind_limits(self.server.limits, self.server.peers, str(self.client_address[0]),
                         wakeup)
        # Both of the association's threads block on what they wait for
        # instead of polling every millisecond (see ``reactor``).
        install_wakeups(assoc, wakeup)
        # C-STORE data sets go straight into the spool as they arrive.
        install_spooling(assoc, self.server.spool)
        # pynetdicom's standard handlers format a description of every PDU
        # and DIMSE message for its debug log, which the node never shows
        # (its records below WARNING are dropped, see ``ops.logs``).
        for event, handler in STANDARD_LOG_HANDLERS:
            assoc.unbind(event, handler)
        return assoc


class NodeServer(ThreadedAssociationServer):
    """The association server, with the behaviour a hospital network needs.

    - TCP_NODELAY on every accepted socket (PDUs are small and latency-bound).
    - The TLS handshake runs on the connection's own thread with a timeout,
      not in the accept loop, so one stalled client cannot block the others.
    - Peers outside ``allowed_peers`` are dropped before any DICOM exchange.
    - Near the process's file-descriptor limit a new connection is closed at
      once with a log line, keeping descriptors for the ledger and the spool.
    - Each connection reads within :class:`WireLimits` (see ``wire``).
    """

    # socketserver's default listen backlog of 5 drops SYNs (a 1 s client
    # retransmit each) whenever a burst of connections outpaces the accept
    # loop for a moment; the kernel caps this at net.core.somaxconn.
    request_queue_size = 256
    tls_context: ssl.SSLContext | None = None
    tls_handshake_timeout: float = 10.0
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    limits: WireLimits
    peers: PeerCounter
    spool: Spool

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = self.socket.accept()  # type: ignore[union-attr]
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # Descriptors are handed out lowest first, so a new one numbered N
        # means N are already open.
        limit = descriptor_limit()
        if request.fileno() >= limit - FD_RESERVE:
            log.warning("connection_refused_fd_limit", peer=client_address[0],
                        open_descriptors=request.fileno(), limit=limit, reserve=FD_RESERVE)
            return False
        if not self.allowed_networks:
            return True
        peer = ipaddress.ip_address(client_address[0])
        allowed = any(peer in net for net in self.allowed_networks)
        if not allowed:
            log.warning("connection_refused_peer", peer=client_address[0])
        return allowed

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if self.tls_context is not None:
            try:
                request.settimeout(self.tls_handshake_timeout)
                request = self.tls_context.wrap_socket(request, server_side=True)
                request.settimeout(None)
            except (OSError, ssl.SSLError) as exc:
                log.warning("tls_handshake_failed", peer=client_address[0], error=str(exc))
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)


def descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE of this process (systemd sets it from LimitNOFILE)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def build_tls_context(node: NodeConfig) -> ssl.SSLContext | None:
    if not node.tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(node.tls.cert_file), str(node.tls.key_file))
    if node.tls.ca_file is not None:
        ctx.load_verify_locations(str(node.tls.ca_file))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class NodeAE(AE):
    """An AE whose association limit counts only peers that asked to associate.

    pynetdicom counts every accepted TCP connection as an association from
    the moment it is opened, so a handful of idle or port-scanning
    connections would make a real scanner's request fail with "local limit
    exceeded". Connections that have not sent an A-ASSOCIATE-RQ are bounded by
    the ACSE timeout instead.
    """

    @property
    def active_associations(self) -> list[Any]:
        return [
            assoc for assoc in super().active_associations
            if not assoc.is_acceptor or assoc.requestor.primitive is not None
        ]


def build_ae(node: NodeConfig, extra: Sequence[ExtraService] = ()) -> AE:
    """The acceptor AE with its presentation contexts and association limits."""
    ae = NodeAE(ae_title=node.ae_title)
    ae.add_supported_context(CTImageStorage, CT_SYNTAXES)
    for sop_class in IGNORED_SOP_CLASSES:
        ae.add_supported_context(sop_class, UNCOMPRESSED)
    ae.add_supported_context(Verification)
    for service in extra:
        for abstract, syntaxes, scu_role, scp_role in service.contexts:
            ae.add_supported_context(abstract, list(syntaxes), scu_role=scu_role,
                                     scp_role=scp_role)
    ae.require_called_aet = node.require_called_aet
    ae.require_calling_aet = list(node.allowed_calling_aets)
    ae.maximum_associations = node.max_associations
    ae.maximum_pdu_size = node.max_pdu
    ae.acse_timeout = node.acse_timeout_s
    ae.dimse_timeout = node.dimse_timeout_s
    ae.network_timeout = node.network_timeout_s
    return ae


class Receiver:
    """Owns the listening socket; ``start`` binds, ``stop`` closes it."""

    def __init__(self, node: NodeConfig, handlers: StoreHandlers,
                 extra: Sequence[ExtraService] = ()) -> None:
        self.node = node
        self.handlers = handlers
        self.extra = list(extra)
        # Every C-STORE data set is written to its spool file as its
        # fragments arrive (see ``streaming``), so an instance is never held
        # in memory whole: a 1 GiB enhanced CT costs a PDU buffer, not a
        # gigabyte, and its bytes are copied once, into the spool.
        self.ae = build_ae(node, self.extra)
        self.server: NodeServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    @property
    def listening(self) -> bool:
        """Whether the accept loop runs (False once stopped or if it died)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        server = self.ae.make_server(
            (self.node.host, self.node.port),
            evt_handlers=self.handlers.bindings() + [b for s in self.extra for b in s.bindings],
            server_class=NodeServer,
            request_handler=NodeRequestHandler,
        )
        assert isinstance(server, NodeServer)  # made from server_class
        server.tls_context = build_tls_context(self.node)
        server.tls_handshake_timeout = self.node.tls.handshake_timeout_s
        server.limits = WireLimits(
            max_pdu=self.node.max_pdu, acse_timeout_s=self.node.acse_timeout_s,
            network_timeout_s=self.node.network_timeout_s,
            max_per_peer=self.node.max_associations_per_peer,
        )
        server.peers = PeerCounter(self.node.max_associations_per_peer)
        server.spool = self.handlers.spool
        server.allowed_networks = tuple(
            ipaddress.ip_network(p, strict=False) for p in self.node.allowed_peers
        )
        server.daemon_threads = True
        self.server = server
        self._thread = threading.Thread(target=server.serve_forever, name="dicom-listener",
                                        daemon=True)
        self._thread.start()
        log.info("listening", ae_title=self.node.ae_title, host=self.node.host, port=self.port,
                 tls=server.tls_context is not None)

    def stop_accepting(self) -> None:
        """Close the listening socket; associations in flight keep running."""
        if self.server is not None:
            # BaseServer.shutdown stops serve_forever; pynetdicom's override
            # expects a server made by AE.start_server, which this is not.
            socketserver.BaseServer.shutdown(self.server)
            self.server.server_close()

    def active_associations(self) -> int:
        return len(self.server.active_associations) if self.server is not None else 0
