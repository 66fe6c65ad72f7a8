"""The Storage SCP: thin C-STORE / C-ECHO handlers over the spool and ledger.

A handler validates the header, writes the bytes exactly as received to the
spool (durably), records them in the ledger and only then answers Success.
Nothing slow (decoding pixels, segmentation) happens on an association
thread. Every refusal is a named status with an ErrorComment.
"""

from __future__ import annotations

import hashlib
import io
import ipaddress
import socket
import socketserver
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from ..config import NodeConfig, SeriesConfig
from ..jobqueue import Ledger
from ..volume import CT_IMAGE_STORAGE
from . import status
from .filemeta import encode_file_meta
from .sender import STORAGE_COMMITMENT_PUSH
from .spool import PendingWrite, Spool

log = structlog.get_logger("oncoseg_node.receiver")

UNDEFINED_LENGTH = 0xFFFFFFFF
# Only what intake decides on is converted from the encoding; the file keeps
# every element as received.
HEADER_TAGS = [Tag(keyword) for keyword in (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "SeriesDescription", "ImageType", "InstanceNumber", "ImagesInAcquisition",
    "Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames",
)]
PIXEL_DATA = Tag(0x7FE0, 0x0010)
PIXEL_DATA_TAG_LE = b"\xe0\x7f\x10\x00"
PIXEL_DATA_TAG_BE = b"\x7f\xe0\x00\x10"

# Compressed transfer syntaxes are refused at negotiation: the node never
# accepts an instance it cannot decode later.
UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
# Objects a CT simulator sends alongside the images. They are acknowledged so
# the scanner's send job completes, logged, and not stored.
IGNORED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.67": "X-Ray Radiation Dose SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
}


@dataclass(frozen=True)
class Refusal:
    status: int
    comment: str

    def as_dataset(self) -> Dataset:
        ds = Dataset()
        ds.Status = self.status
        ds.ErrorComment = self.comment[:64]
        return ds


@dataclass(frozen=True)
class ParsedInstance:
    """A received instance's header, parsed without copying its pixel data.

    ``pixel_bytes`` is how many PixelData bytes actually arrived (None when
    there is no PixelData or it is encapsulated with undefined length).
    """

    header: Dataset
    pixel_bytes: int | None


def parse_instance(stream: bytes, transfer_syntax: UID) -> ParsedInstance:
    """Parse a received dataset's header and locate its PixelData.

    ``stream`` is the dataset as it came over the wire (no file meta), in
    ``transfer_syntax``. Parsing stops before PixelData, so a large image is
    neither copied nor decoded on the association thread; its length is read
    from the encoding.
    """
    fp = io.BytesIO(stream)
    header = read_dataset(fp, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian,
                          stop_when=_at_pixel_data, specific_tags=HEADER_TAGS)
    offset = fp.tell()
    pixel_bytes = None
    if stream[offset:offset + 4] in (PIXEL_DATA_TAG_LE, PIXEL_DATA_TAG_BE):
        fmt = "<" if transfer_syntax.is_little_endian else ">"
        if transfer_syntax.is_implicit_VR:  # tag, 4-byte length
            (declared,) = struct.unpack(fmt + "I", stream[offset + 4:offset + 8])
            value_at = offset + 8
        else:  # tag, VR, 2 reserved bytes, 4-byte length
            (declared,) = struct.unpack(fmt + "I", stream[offset + 8:offset + 12])
            value_at = offset + 12
        if declared != UNDEFINED_LENGTH:
            pixel_bytes = min(declared, max(len(stream) - value_at, 0))
    return ParsedInstance(header, pixel_bytes)


def _at_pixel_data(tag: Any, vr: Any, length: int) -> bool:
    return tag == PIXEL_DATA


def check_header(parsed: ParsedInstance, command: Any) -> Refusal | None:
    """Reasons to refuse an instance before anything is stored."""
    ds = parsed.header
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        if not str(ds.get(keyword, "") or "").strip():
            return Refusal(status.CANNOT_UNDERSTAND, f"{keyword} missing")
    if str(ds.SOPInstanceUID) != str(command.AffectedSOPInstanceUID):
        return Refusal(status.CANNOT_UNDERSTAND, "SOPInstanceUID differs from the command's")
    if str(ds.SOPClassUID) != str(command.AffectedSOPClassUID):
        return Refusal(status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                       "SOPClassUID differs from the command's")
    if str(ds.SOPClassUID) == CT_IMAGE_STORAGE:
        return _check_pixel_length(parsed)
    return None


def _check_pixel_length(parsed: ParsedInstance) -> Refusal | None:
    ds = parsed.header
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return Refusal(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "image pixel module incomplete")
    expected = rows * cols * samples * frames * bits // 8
    if parsed.pixel_bytes is None:
        return Refusal(status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "PixelData missing")
    if parsed.pixel_bytes < expected:
        return Refusal(
            status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"PixelData has {parsed.pixel_bytes} bytes, expected {expected}",
        )
    return None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class OpenAssociations:
    """Which series are still arriving on an open association (memory only:
    after a restart no association is open, and the quiet period decides)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[int, set[str]] = {}

    def saw(self, assoc_id: int, series_uid: str) -> None:
        with self._lock:
            self._series.setdefault(assoc_id, set()).add(series_uid)

    def ended(self, assoc_id: int) -> None:
        with self._lock:
            self._series.pop(assoc_id, None)

    def is_open(self, series_uid: str) -> bool:
        with self._lock:
            return any(series_uid in uids for uids in self._series.values())


class StoreHandlers:
    """The event handlers bound to the listener."""

    def __init__(self, node: NodeConfig, series: SeriesConfig, spool: Spool,
                 ledger: Ledger, on_activity: Callable[[], None] | None = None,
                 on_committed: Callable[[int], None] | None = None) -> None:
        self.node = node
        self.series = series
        self.spool = spool
        self.ledger = ledger
        self.on_activity = on_activity or (lambda: None)
        # told the delivery id a destination committed to (delivery latency)
        self.on_committed = on_committed or (lambda delivery_id: None)
        self.min_free_bytes = node.min_free_disk_mb * 1024 * 1024
        self.received = 0
        self._counter_lock = threading.Lock()
        self.associations = OpenAssociations()

    def bindings(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_RELEASED, self.handle_association_end),
            (evt.EVT_ABORTED, self.handle_association_end),
            (evt.EVT_N_EVENT_REPORT, self.handle_commitment_report),
        ]

    def handle_commitment_report(self, event: Any) -> tuple[int, None]:
        """A destination's Storage Commitment result for one of our deliveries."""
        info = event.event_information
        transaction_uid = str(info.get("TransactionUID", "") or "")
        failed = info.get("FailedSOPSequence") or []
        committed = int(event.request.EventTypeID) == 1 and not failed
        if committed:
            reason = "committed by destination"
        else:
            reasons = sorted({f"0x{int(item.get('FailureReason', 0)):04X}" for item in failed})
            reason = f"destination did not commit (failure reason {', '.join(reasons)})"
        delivery_id = self.ledger.commitment_report(transaction_uid, committed, reason)
        log.info("storage_commitment_report", transaction_uid=transaction_uid,
                 committed=committed, delivery_id=delivery_id, reason=reason,
                 calling_ae=str(event.assoc.requestor.ae_title).strip(), audit=committed)
        if committed and delivery_id is not None:
            self.on_committed(delivery_id)
        return status.SUCCESS, None

    def handle_association_end(self, event: Any) -> None:
        self.associations.ended(id(event.assoc))

    def handle_echo(self, event: Any) -> int:
        return status.SUCCESS

    def handle_store(self, event: Any) -> int | Dataset:
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        bound = log.bind(calling_ae=calling_ae)
        try:
            if self.spool.free_bytes() < self.min_free_bytes:
                bound.warning("store_refused_disk_low", free_bytes=self.spool.free_bytes())
                return Refusal(status.OUT_OF_RESOURCES, "node disk below free-space limit"
                               ).as_dataset()
            syntax = UID(str(event.context.transfer_syntax))
            stream = event.encoded_dataset(include_meta=False)
            request = event.request
            # The file starts being written and synced at once (named from the
            # command's UIDs, which check_header requires to equal the
            # dataset's); validation runs meanwhile and decides if it is kept.
            pending = self.spool.begin((encode_file_meta(
                str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                str(syntax), calling_ae), stream))
            try:
                return self._validate_and_accept(pending, stream, syntax, request, calling_ae,
                                                 bound, id(event.assoc))
            except BaseException:
                pending.abort()
                raise
        except OSError as exc:
            bound.error("store_failed_io", error=str(exc))
            return Refusal(status.OUT_OF_RESOURCES, f"storage error: {exc.strerror}").as_dataset()

    def _validate_and_accept(self, pending: PendingWrite, stream: bytes, syntax: UID,
                             request: Any, calling_ae: str, bound: Any,
                             event_assoc_id: int) -> int | Dataset:
        try:
            parsed = parse_instance(stream, syntax)
        except Exception as exc:  # any parse failure is the peer's malformed data
            pending.abort()
            bound.warning("store_refused_unparsable", error=str(exc))
            return Refusal(status.CANNOT_UNDERSTAND, "data set cannot be parsed").as_dataset()
        refusal = check_header(parsed, request)
        if refusal is not None:
            pending.abort()
            bound.warning("store_refused", status=status.describe(refusal.status),
                          reason=refusal.comment)
            return refusal.as_dataset()
        return self._accept(pending, stream, parsed.header, calling_ae, bound, event_assoc_id)

    def _accept(self, pending: PendingWrite, stream: bytes, header: Dataset, calling_ae: str,
                bound: Any, event_assoc_id: int) -> int:
        sop_class = str(header.SOPClassUID)
        uid = str(header.SOPInstanceUID)
        series_uid = str(header.SeriesInstanceUID)
        bound = bound.bind(series_uid=series_uid, sop_instance_uid=uid)
        if sop_class != CT_IMAGE_STORAGE:
            pending.abort()
            bound.info("instance_ignored", reason=IGNORED_SOP_CLASSES.get(sop_class, sop_class))
            return status.SUCCESS
        image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
        if "LOCALIZER" in image_type:
            pending.abort()
            bound.info("instance_ignored", reason="localizer (ImageType LOCALIZER)")
            return status.SUCCESS
        try:
            # Identity of an instance is its dataset as sent, not our file meta.
            digest = hashlib.sha256(stream).hexdigest()
            existing = self.ledger.find_instance(uid)
            replace = False
            if existing is not None:
                if existing.sha256 == digest:
                    bound.info("instance_duplicate_identical")
                    self.ledger.touch_series(existing.series_uid)
                    pending.abort()
                    return status.SUCCESS
                if self.series.duplicate_policy == "keep_first":
                    bound.warning("instance_duplicate_conflict", policy="keep_first",
                                  kept_sha256=existing.sha256, refused_sha256=digest)
                    pending.abort()
                    return status.SUCCESS
                bound.warning("instance_duplicate_conflict", policy="replace",
                              old_sha256=existing.sha256, new_sha256=digest)
                replace = True
            record = dict(
                sop_instance_uid=uid, series_uid=series_uid,
                study_uid=str(header.StudyInstanceUID), sop_class_uid=sop_class,
                relpath=pending.relpath, sha256=digest, size=pending.size,
                calling_ae=calling_ae,
                description=str(header.get("SeriesDescription", "") or ""),
                replace=replace, instance_number=_int_or_none(header.get("InstanceNumber")),
                images_in_acquisition=_int_or_none(header.get("ImagesInAcquisition")),
            )
            # The ledger is written after the file is durable: overlapping the
            # two fsyncs was measured slower on ext4, which serialises them.
            pending.commit(digest)
            self.ledger.record_instance(**record)
        except BaseException:
            pending.abort()
            raise
        self.associations.saw(event_assoc_id, series_uid)
        if replace and existing is not None:
            self.spool.remove(existing.relpath)
        with self._counter_lock:
            self.received += 1
        self.on_activity()
        return status.SUCCESS


class BulkReadSocket(AssociationSocket):
    """Reads a PDU's bytes straight into one buffer.

    The default reads 4 KiB per ``recv`` call and appends: 128 system calls
    and copies for one 512x512 CT slice. Reading into a preallocated buffer
    with ``recv_into`` takes as few calls as the kernel allows.
    """

    def recv(self, nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            count = self.socket.recv_into(view[received:], nr_bytes - received)
            if count == 0:  # connection closed: return what arrived, as the base does
                return buffer[:received]
            received += count
        return buffer


class NodeRequestHandler(RequestHandler):
    """Creates each association on a :class:`BulkReadSocket`."""

    def _create_association(self) -> Any:
        assoc = super()._create_association()
        # The socket object already carries the connection's state (its
        # constructor queued the transport-connection event), so it is
        # specialised in place; BulkReadSocket adds behaviour, no state.
        assoc.dul.socket.__class__ = BulkReadSocket
        return assoc


class NodeServer(ThreadedAssociationServer):
    """The association server, with the behaviour a hospital network needs.

    - TCP_NODELAY on every accepted socket (PDUs are small and latency-bound).
    - The TLS handshake runs on the connection's own thread with a timeout,
      not in the accept loop, so one stalled client cannot block the others.
    - Peers outside ``allowed_peers`` are dropped before any DICOM exchange.
    """

    tls_context: ssl.SSLContext | None = None
    tls_handshake_timeout: float = 10.0
    allowed_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    def get_request(self) -> tuple[socket.socket, Any]:
        client, address = self.socket.accept()  # type: ignore[union-attr]
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
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


def build_ae(node: NodeConfig) -> AE:
    """The acceptor AE with its presentation contexts and association limits."""
    ae = NodeAE(ae_title=node.ae_title)
    ae.add_supported_context(CT_IMAGE_STORAGE, UNCOMPRESSED)
    for sop_class in IGNORED_SOP_CLASSES:
        ae.add_supported_context(sop_class, UNCOMPRESSED)
    ae.add_supported_context(Verification)
    # Destinations report Storage Commitment on an association of their own,
    # acting as SCP of the service: accept that role for the requestor.
    ae.add_supported_context(STORAGE_COMMITMENT_PUSH, UNCOMPRESSED[:2], scu_role=True,
                             scp_role=True)
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
                 extra_handlers: list[tuple[Any, Callable[..., Any]]] | None = None) -> None:
        self.node = node
        self.handlers = handlers
        self.extra_handlers = extra_handlers or []
        self.ae = build_ae(node)
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
            evt_handlers=self.handlers.bindings() + self.extra_handlers,
            server_class=NodeServer,
            request_handler=NodeRequestHandler,
        )
        server.tls_context = build_tls_context(self.node)
        server.tls_handshake_timeout = self.node.tls.handshake_timeout_s
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
