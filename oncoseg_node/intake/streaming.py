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
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.pdu_primitives import P_DATA

from oncoseg_node.dicom.filemeta import encode_file_meta
from oncoseg_node.intake.spool import IncomingFile, Spool

log = structlog.get_logger("oncoseg_node.receiver")

# Message Control Header bits of a presentation data value (PS3.8 E.2).
COMMAND_FRAGMENT = 0x01
LAST_FRAGMENT = 0x02
# CommandDataSetType when no data set follows the command (PS3.7 E.1).
NO_DATA_SET = 0x0101


class SpoolingDIMSE(DIMSEServiceProvider):
    """The DIMSE provider of an acceptor association (installed by :func:`install`)."""

    spool: Spool
    _receiving: IncomingFile | None
    _unhandled: set[IncomingFile]
    _lock: threading.Lock

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Decode a P-DATA: a spooled request's data fragments go to its file."""
        for context_id, data in primitive.presentation_data_value_list:
            incoming = self._receiving
            if incoming is not None and not data[0] & COMMAND_FRAGMENT:
                incoming.write(memoryview(data)[1:])
                if data[0] & LAST_FRAGMENT:
                    self._received(incoming)
                continue
            single = P_DATA()
            # pynetdicom's setter wants lists, its annotation says tuples
            single.presentation_data_value_list = cast(Any, [[context_id, data]])
            before = self.message
            command_was_pending = not isinstance(before, C_STORE_RQ)
            super().receive_primitive(single)
            message = self.message
            if (command_was_pending and isinstance(message, C_STORE_RQ)
                    and message.command_set.CommandDataSetType != NO_DATA_SET):
                self._start_file(message)

    def _start_file(self, message: DIMSEMessage) -> None:
        """The command is complete and a data set follows: open its spool file."""
        context_id = message.context_id
        context = None if context_id is None else self.assoc._accepted_cx.get(context_id)
        if context is None:  # pynetdicom refuses the request itself
            return
        command = message.command_set
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
        message = self.message
        assert message is not None
        self.message = None
        try:
            request = message.message_to_primitive()
        except Exception:
            log.exception("dimse_message_invalid")
            self.dul.event_queue.put("Evt19")  # pynetdicom's answer: abort
            return
        request._node_incoming = incoming  # type: ignore[union-attr]
        self.msg_queue.put(cast(Any, (message.context_id, request)))

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
        for incoming in left:
            incoming.discard()


class SpoolingAssociation(Association):
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
    dimse._unhandled = set()
    dimse._lock = threading.Lock()
    assoc.__class__ = SpoolingAssociation


def take_incoming(assoc: Any, request: Any) -> IncomingFile | None:
    """The spool file of a C-STORE request (see :meth:`SpoolingDIMSE.take`)."""
    dimse = assoc.dimse
    return dimse.take(request) if isinstance(dimse, SpoolingDIMSE) else None
