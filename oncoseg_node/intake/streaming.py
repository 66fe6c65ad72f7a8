"""C-STORE data sets written into the spool as their fragments arrive.

pynetdicom's chunked receive writes each data set to a temporary file of its
own, which then had to be copied into the spool, read again to be hashed and
a third time to be parsed. Here each acceptor association's DIMSE provider
is a :class:`SpoolingDIMSE`: when a C-STORE request's command set is
complete, an :class:`~oncoseg_node.intake.spool.IncomingFile` is opened in
the spool with the node's file meta, and every data fragment is written to
it straight from the received PDU (a view, not a copy) and hashed on the way.
At the last fragment its fsync starts on a spool writer, and the request is
queued for the association thread with the file attached; the handler takes
it with :func:`take_incoming`, validates, waits for the fsync and commits.

Every other message goes through pynetdicom's own decoding (a C-ECHO, an
N-EVENT-REPORT, a request on a context the association did not accept).
An association that ends with files not yet handled (a data set cut off, a
request queued behind an abort) removes them as its thread ends.
"""

from __future__ import annotations

import struct
import threading
from typing import Any, cast

import structlog
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

from oncoseg_node.dicom.filemeta import encode_file_meta
from oncoseg_node.intake.commands import store_request, store_response
from oncoseg_node.intake.reactor import WakingAssociation
from oncoseg_node.intake.spool import IncomingFile, Spool

log = structlog.get_logger("oncoseg_node.receiver")

# Message Control Header bits of a presentation data value (PS3.8 E.2).
COMMAND_FRAGMENT = 0x01
LAST_FRAGMENT = 0x02
WHOLE_COMMAND = COMMAND_FRAGMENT | LAST_FRAGMENT
# A presentation data value's length, context ID and control header (PS3.8 9.3.5.1).
PDV_OVERHEAD = 6
P_DATA_TF_TYPE = 0x04
P_DATA_TF_EVENT = "Evt10"  # P-DATA-TF PDU received (PS3.8 9.2)
PDU_HEADER = 6
PDV_HEADER = 6  # item length (4), context ID (1), control header (1)
# CommandDataSetType when no data set follows the command (PS3.7 E.1).
NO_DATA_SET = 0x0101


class SpoolingDIMSE(DIMSEServiceProvider):
    """The DIMSE provider of an acceptor association (installed by :func:`install`)."""

    spool: Spool
    _receiving: IncomingFile | None
    _request: C_STORE | None  # decoded directly, waiting for its data set
    _unhandled: set[IncomingFile]
    _lock: threading.Lock

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Decode a P-DATA: a spooled request's data fragments go to its file."""
        for context_id, data in primitive.presentation_data_value_list:
            control = data[0]
            incoming = self._receiving
            if incoming is not None and not control & COMMAND_FRAGMENT:
                incoming.write(memoryview(data)[1:])
                if control & LAST_FRAGMENT:
                    self._received(incoming)
                continue
            if incoming is not None:
                # A command before the data set's last fragment (PS3.8 E.2):
                # it would be answered as the earlier request, with the later
                # one's data set. Nothing can be trusted of either: abort.
                log.warning("dimse_command_inside_data_set", context_id=context_id)
                self._receiving = None
                self._request = None
                self.message = None
                self.dul.event_queue.put("Evt19")
                return
            if (control & WHOLE_COMMAND == WHOLE_COMMAND and self.message is None
                    and incoming is None):
                # The usual case: the whole command in one fragment.
                request = store_request(memoryview(data)[1:])
                if request is not None and context_id in self.assoc._accepted_cx:
                    request._context_id = context_id
                    self._request = request
                    self._start_file(request, context_id)
                    continue
            single = P_DATA()
            # pynetdicom's setter wants lists of bytes, its annotation says tuples
            single.presentation_data_value_list = cast(Any, [[context_id, bytes(data)]])
            before = self.message
            command_was_pending = not isinstance(before, C_STORE_RQ)
            try:
                super().receive_primitive(single)
                message = self.message
                if (command_was_pending and isinstance(message, C_STORE_RQ)
                        and message.command_set.CommandDataSetType != NO_DATA_SET
                        and message.context_id in self.assoc._accepted_cx):
                    self._start_file(message.command_set, message.context_id)
            except Exception:
                # A command set lacking an element PS3.7 requires (CommandField,
                # CommandDataSetType, a UID) makes pynetdicom's decoding raise on
                # this reader thread, which would die with the connection held:
                # answered as pynetdicom answers a message it cannot convert.
                log.exception("dimse_message_invalid")
                self.message = None
                self.dul.event_queue.put("Evt19")
                return

    def _start_file(self, command: Any, context_id: int | None) -> None:
        """The command is complete and a data set follows: open its spool file."""
        context = self.assoc._accepted_cx[cast(int, context_id)]
        try:
            meta = encode_file_meta(
                str(command.AffectedSOPClassUID), str(command.AffectedSOPInstanceUID),
                str(context.transfer_syntax[0]),
                str(self.assoc.requestor.ae_title).strip())
        except (UnicodeError, ValueError, OverflowError, struct.error):
            # UIDs no file meta can hold (not ASCII, over 64 KiB): the
            # handler's command check refuses them; the data set is received
            # and dropped meanwhile, never held in memory.
            meta = None
        incoming = self.spool.incoming(meta)
        with self._lock:
            self._unhandled.add(incoming)
        self._receiving = incoming

    def _received(self, incoming: IncomingFile) -> None:
        """The last fragment arrived: start the fsync, queue the request (as pynetdicom does)."""
        incoming.finish()
        self._receiving = None
        request: Any = self._request
        if request is not None:
            self._request = None
            context_id = request._context_id
        else:
            message = self.message
            assert message is not None
            self.message = None
            context_id = message.context_id
            try:
                request = message.message_to_primitive()
            except Exception:
                log.exception("dimse_message_invalid")
                self.dul.event_queue.put("Evt19")  # pynetdicom's answer: abort
                return
            if not request.is_valid_request:
                # No MessageID: pynetdicom would drop the request unanswered and
                # leave the sender waiting for the network timeout; a response
                # cannot name the request, so the association is aborted.
                log.warning("dimse_request_incomplete", message=type(request).__name__)
                self.dul.event_queue.put("Evt19")
                return
        request._node_incoming = incoming
        self.msg_queue.put(cast(Any, (context_id, request)))

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a DIMSE message; a plain C-STORE response is encoded directly."""
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
            command = store_response(primitive)
            limit = self.maximum_pdu_size
            if command is not None and (not limit or len(command) + PDV_OVERHEAD <= limit):
                pdata = P_DATA()
                pdata.presentation_data_value_list = cast(
                    Any, [[context_id, bytes([WHOLE_COMMAND]) + command]])
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)

    def take(self, request: Any) -> IncomingFile | None:
        """The file of ``request``, now the caller's; None if it came in memory.

        Raises OSError if the association ended and its file was removed.
        """
        incoming: IncomingFile | None = getattr(request, "_node_incoming", None)
        if incoming is None:
            return None
        with self._lock:
            if incoming not in self._unhandled:
                raise OSError("association ended before the instance was handled")
            self._unhandled.discard(incoming)
        return incoming

    def discard_unhandled(self) -> None:
        """Remove every file no handler took (the association's thread has ended)."""
        with self._lock:
            left, self._unhandled = self._unhandled, set()
        self._receiving = None
        self._request = None
        for incoming in left:
            incoming.discard()


class ReceivedPData(P_DATA_TF):
    """A received P-DATA-TF whose values are views of the PDU as read, not copies."""

    def __init__(self, values: list[tuple[int, memoryview]]) -> None:
        super().__init__()
        self.values = values

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        primitive.presentation_data_value_list = []
        primitive.presentation_data_value_list.extend(cast(Any, self.values))
        return primitive


class SpoolingDUL(DULServiceProvider):
    """The upper layer of an acceptor association: P-DATA-TF decoded without copies.

    pynetdicom copies each received PDU twice more before its values reach
    the DIMSE provider (to ``bytes``, then each value sliced out); a C-STORE
    data set's fragments are only written to their file, so views do. A
    PDU whose items do not add up, and every other PDU type, is decoded by
    pynetdicom as before.
    """

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        if bytestream[0] != P_DATA_TF_TYPE:
            return super()._decode_pdu(bytestream)
        view = memoryview(bytestream)
        values: list[tuple[int, memoryview]] = []
        at, end = PDU_HEADER, len(bytestream)
        while at < end:
            if end - at < PDV_HEADER:
                return super()._decode_pdu(bytestream)
            (length,) = struct.unpack_from(">I", bytestream, at)
            if length < 2 or at + 4 + length > end:
                return super()._decode_pdu(bytestream)
            values.append((bytestream[at + 4], view[at + 5:at + 4 + length]))
            at += 4 + length
        return ReceivedPData(values), P_DATA_TF_EVENT


class SpoolingAssociation(WakingAssociation):
    """An acceptor association whose unhandled spool files go when its thread ends."""

    def run(self) -> None:
        try:
            super().run()
        finally:
            dimse = self.dimse
            if isinstance(dimse, SpoolingDIMSE):
                dimse.discard_unhandled()


def install(assoc: Association, spool: Spool) -> None:
    """Make a new acceptor association (not yet started) receive data sets into ``spool``."""
    dimse = assoc.dimse
    dimse.__class__ = SpoolingDIMSE
    assert isinstance(dimse, SpoolingDIMSE)
    dimse.spool = spool
    dimse._receiving = None
    dimse._request = None
    dimse._unhandled = set()
    dimse._lock = threading.Lock()
    assoc.__class__ = SpoolingAssociation
    assoc.dul.__class__ = SpoolingDUL


def take_incoming(assoc: Any, request: Any) -> IncomingFile | None:
    """The spool file of a C-STORE request (see :meth:`SpoolingDIMSE.take`)."""
    dimse = assoc.dimse
    return dimse.take(request) if isinstance(dimse, SpoolingDIMSE) else None
