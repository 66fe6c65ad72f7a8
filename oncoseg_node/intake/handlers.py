"""The C-STORE and C-ECHO handlers: validate, store durably, record, then answer.

Thin by design: nothing slow (decoding pixels, segmentation) happens on an
association thread.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage
from pynetdicom import evt
from pynetdicom.events import EventHandlerType

from oncoseg_node.config import NodeConfig, SeriesConfig
from oncoseg_node.dicom import status
from oncoseg_node.dicom.filemeta import encode_file_meta
from oncoseg_node.intake.associations import Associations, how_aborted, how_closed
from oncoseg_node.intake.checks import check_command, check_header
from oncoseg_node.intake.headers import (
    IGNORED_SOP_CLASSES,
    Refusal,
    int_or_none,
    parse_instance,
    slice_position,
)
from oncoseg_node.intake.spool import IncomingFile, PendingWrite, Spool
from oncoseg_node.intake.streaming import take_incoming
from oncoseg_node.ledger import Ledger
from oncoseg_node.ledger.intake import ENDED_BY_RELEASE, Recorded

log = structlog.get_logger("oncoseg_node.receiver")

class StoreHandlers:
    """The event handlers bound to the listener."""

    def __init__(self, node: NodeConfig, series: SeriesConfig, spool: Spool,
                 ledger: Ledger, on_activity: Callable[[], None] | None = None,
                 on_association_end: Callable[[], None] | None = None) -> None:
        self.node = node
        self.series = series
        self.spool = spool
        self.ledger = ledger
        self.on_activity = on_activity or (lambda: None)
        self.min_free_bytes = node.min_free_disk_mb * 1024 * 1024
        self.received = 0
        self.refused: dict[int, int] = {}  # instances refused, by the status answered
        self._counter_lock = threading.Lock()
        self.associations = Associations()
        self.on_association_end = on_association_end or (lambda: None)

    def bindings(self) -> list[EventHandlerType]:
        return [
            (evt.EVT_C_STORE, self.store_and_count),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_RELEASED, self.handle_released),
            (evt.EVT_ABORTED, self.handle_aborted),
            (evt.EVT_ACSE_RECV, self.handle_acse_recv),
            (evt.EVT_CONN_CLOSE, self.handle_conn_close),
        ]

    def refused_counts(self) -> dict[int, int]:
        """Instances refused since start, by status (a copy: scrapes run on other threads)."""
        with self._counter_lock:
            return dict(sorted(self.refused.items()))

    def handle_released(self, event: Any) -> None:
        self._association_ended(event.assoc, ENDED_BY_RELEASE)

    def handle_aborted(self, event: Any) -> None:
        self._association_ended(event.assoc, how_aborted(event.assoc))

    def handle_acse_recv(self, event: Any) -> None:
        self.associations.abort_primitive(event.assoc, event.primitive)

    def handle_conn_close(self, event: Any) -> None:
        self._association_ended(event.assoc, how_closed(event.assoc))

    def _association_ended(self, assoc: Any, how: str) -> None:
        """Record in the ledger how the series this association carried were left."""
        ended = self.associations.end(assoc, how)
        if ended is None or not ended[0]:
            return
        series_uids, how = ended
        self._record_end(series_uids, how, assoc)

    def _record_end(self, series_uids: list[str], how: str, assoc: Any) -> None:
        try:
            self.ledger.association_ended(series_uids, how,
                                          self.associations.still_open(series_uids))
        except Exception:  # the crash-time mark stays: at worst the series counts as interrupted
            log.exception("association_end_not_recorded", series=series_uids, ended_by=how)
            return
        requestor = getattr(assoc, "requestor", None)
        calling_ae = str(getattr(requestor, "ae_title", "") or "").strip()
        log.info("association_ended", calling_ae=calling_ae, ended_by=how,
                 series=series_uids, interrupted=how != ENDED_BY_RELEASE)
        self.on_association_end()

    def _saw(self, assoc: Any, series_uid: str) -> None:
        """The series is arriving on ``assoc``; if that association already ended
        (its connection closed while this C-STORE finished), record that end again."""
        ended_by = self.associations.saw(assoc, series_uid)
        if ended_by is not None:
            self._record_end([series_uid], ended_by, assoc)

    def handle_echo(self, event: Any) -> int:
        return status.SUCCESS

    def store_and_count(self, event: Any) -> int | Dataset:
        """:meth:`handle_store`, counting each refusal by the status it answered."""
        answer = self.handle_store(event)
        code = int(answer.Status) if isinstance(answer, Dataset) else int(answer)
        if code != status.SUCCESS and not status.is_warning(code):
            with self._counter_lock:
                self.refused[code] = self.refused.get(code, 0) + 1
        return answer

    def handle_store(self, event: Any) -> int | Dataset:
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        bound = log.bind(calling_ae=calling_ae)
        pending: PendingWrite | None = None
        incoming: IncomingFile | None = None
        source: bytes | tuple[Path, int, int]
        try:
            # The data set was written to its spool file as it arrived and
            # its fsync started at the last fragment (see ``streaming``);
            # from here the file is this handler's: committed or removed.
            incoming = take_incoming(event.assoc, event.request)
            syntax = UID(str(event.context.transfer_syntax))
            request = event.request
            refusal = check_command(request)
            if refusal is not None:
                bound.warning("store_refused", status=status.describe(refusal.status),
                              reason=refusal.comment)
                return refusal.as_dataset()
            if incoming is None:  # the data set came in memory
                pending, digest, source = self._write_in_memory(request, syntax, calling_ae)
            else:
                pending = incoming.pending()
                digest, source = incoming.sha256, self._header_source(incoming)
            if (self.spool.free_bytes_recent() < self.min_free_bytes
                    and (free := self.spool.free_bytes()) < self.min_free_bytes):
                bound.warning("store_refused_disk_low", free_bytes=free)
                return Refusal(status.OUT_OF_RESOURCES, "node disk below free-space limit"
                               ).as_dataset()
            return self._validate_and_accept(pending, source, digest, syntax, request,
                                             calling_ae, bound, event.assoc)
        except OSError as exc:
            bound.error("store_failed_io", error=str(exc))
            return Refusal(status.OUT_OF_RESOURCES, f"storage error: {exc.strerror or exc}"
                           ).as_dataset()
        except Exception as exc:
            # A bug or an input no check foresaw: the sender gets a named
            # failure it can report, the log gets the traceback, once.
            bound.exception("store_failed_unexpected", error=f"{type(exc).__name__}: {exc}")
            return Refusal(status.PROCESSING_FAILURE,
                           f"node error {type(exc).__name__}; nothing stored").as_dataset()
        finally:
            # Unless committed, a refused or failed instance leaves no file.
            if pending is not None:
                pending.abort()
            elif incoming is not None:
                incoming.discard()

    def _write_in_memory(self, request: Any, syntax: UID,
                         calling_ae: str) -> tuple[PendingWrite, str, bytes]:
        """Start the spool file of a data set pynetdicom held in memory."""
        data = request.DataSet.getvalue()
        meta = encode_file_meta(str(request.AffectedSOPClassUID),
                                str(request.AffectedSOPInstanceUID), str(syntax), calling_ae)
        return self.spool.begin([meta, data]), hashlib.sha256(data).hexdigest(), data

    @staticmethod
    def _header_source(incoming: IncomingFile) -> bytes | tuple[Path, int, int]:
        """The received data set's bytes if all are in memory, else where its file holds it."""
        if incoming.whole_in_head:
            return bytes(incoming.head)
        return incoming.tmp, incoming.meta_length, incoming.length

    def _validate_and_accept(self, pending: PendingWrite,
                             source: bytes | tuple[Path, int, int], digest: str,
                             syntax: UID, request: Any, calling_ae: str,
                             bound: Any, assoc: Any) -> int | Dataset:
        try:
            if isinstance(source, bytes):
                parsed = parse_instance(source, syntax)
            else:
                path, offset, length = source
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    parsed = parse_instance(fh, syntax, length)
        except Exception as exc:  # any parse failure is the peer's malformed data
            bound.warning("store_refused_unparsable", error=str(exc))
            return Refusal(status.CANNOT_UNDERSTAND, f"unparsable data set: {exc}").as_dataset()
        refusal = check_header(parsed, request)
        if refusal is not None:
            bound.warning("store_refused", status=status.describe(refusal.status),
                          reason=refusal.comment)
            return refusal.as_dataset()
        return self._accept(pending, digest, parsed.header, calling_ae, bound, assoc)

    def _accept(self, pending: PendingWrite, digest: str, header: Dataset,
                calling_ae: str, bound: Any, assoc: Any) -> int:
        sop_class = str(header.SOPClassUID)
        uid = str(header.SOPInstanceUID)
        series_uid = str(header.SeriesInstanceUID)
        bound = bound.bind(series_uid=series_uid, sop_instance_uid=uid)
        if sop_class != CTImageStorage:
            pending.abort()
            bound.info("instance_ignored", reason=IGNORED_SOP_CLASSES.get(sop_class, sop_class))
            return status.SUCCESS
        image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
        if "LOCALIZER" in image_type:
            pending.abort()
            bound.info("instance_ignored", reason="localizer (ImageType LOCALIZER)")
            return status.SUCCESS
        # Identity of an instance is its dataset as sent, not our file meta.
        existing = self.ledger.find_instance(uid)
        if existing is not None and (existing.sha256 == digest
                                     or self.series.duplicate_policy == "keep_first"):
            # Known already and nothing to change: the file being written is
            # not needed. (Concurrent senders are settled by record_instance.)
            pending.abort()
            self._log_duplicate(bound, existing.sha256, digest)
            self.ledger.touch_series(existing.series_uid)
            self._saw(assoc, existing.series_uid)
            return status.SUCCESS
        try:
            # The ledger is written after the file is durable: overlapping the
            # two fsyncs was measured slower on ext4, which serialises them.
            pending.commit(digest)
        except BaseException:
            pending.abort()
            raise
        try:
            result = self.ledger.record_instance(
                sop_instance_uid=uid, series_uid=series_uid,
                study_uid=str(header.StudyInstanceUID), sop_class_uid=sop_class,
                relpath=pending.relpath, sha256=digest, size=pending.size,
                calling_ae=calling_ae,
                description=str(header.get("SeriesDescription", "") or ""),
                duplicate_policy=self.series.duplicate_policy,
                instance_number=int_or_none(header.get("InstanceNumber")),
                images_in_acquisition=int_or_none(header.get("ImagesInAcquisition")),
                slice_position=slice_position(header),
            )
        except BaseException:
            self.spool.remove(pending.relpath)  # no row points at it: not kept
            raise
        if result.outcome is not Recorded.STORED:
            self._log_duplicate(bound, result.existing_sha256, digest)
        if result.spare_relpath is not None:
            self.spool.remove(result.spare_relpath)
        self._saw(assoc, series_uid)
        with self._counter_lock:
            self.received += 1
        self.on_activity()
        return status.SUCCESS

    def _log_duplicate(self, bound: Any, stored_sha256: str | None, digest: str) -> None:
        if stored_sha256 == digest:
            bound.info("instance_duplicate_identical")
        elif self.series.duplicate_policy == "keep_first":
            bound.warning("instance_duplicate_conflict", policy="keep_first",
                          kept_sha256=stored_sha256, refused_sha256=digest)
        else:
            bound.warning("instance_duplicate_conflict", policy="replace",
                          old_sha256=stored_sha256, new_sha256=digest)
