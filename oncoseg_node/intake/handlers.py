"""The C-STORE and C-ECHO handlers: validate, store durably, record, then answer.

Thin by design: nothing slow (decoding pixels, segmentation) happens on an
association thread.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future
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
from oncoseg_node.intake.spool import PendingWrite, Spool
from oncoseg_node.ledger import Ledger
from oncoseg_node.ledger.intake import ENDED_BY_RELEASE, Recorded

log = structlog.get_logger("oncoseg_node.receiver")

# (0002,0000) File Meta Information Group Length, UL, explicit VR little endian
META_GROUP_LENGTH = b"\x02\x00\x00\x00UL"


def received_region(path: Path) -> tuple[Path, int, int]:
    """Where the dataset sits in a file pynetdicom received: (path, offset, length).

    The file is preamble, ``DICM``, pynetdicom's own File Meta Information
    (which we replace with ours) and then the dataset exactly as sent.
    """
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:138] != META_GROUP_LENGTH:
        raise OSError(f"{path}: not the received-dataset file pynetdicom writes")
    (meta_length,) = struct.unpack("<I", head[140:144])
    offset = 144 + meta_length
    return path, offset, path.stat().st_size - offset


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
        try:
            if (self.spool.free_bytes_recent() < self.min_free_bytes
                    and (free := self.spool.free_bytes()) < self.min_free_bytes):
                bound.warning("store_refused_disk_low", free_bytes=free)
                return Refusal(status.OUT_OF_RESOURCES, "node disk below free-space limit"
                               ).as_dataset()
            syntax = UID(str(event.context.transfer_syntax))
            request = event.request
            refusal = check_command(request)
            if refusal is not None:
                bound.warning("store_refused", status=status.describe(refusal.status),
                              reason=refusal.comment)
                return refusal.as_dataset()
            # The dataset arrived in a file (pynetdicom's chunked receive, see
            # transport): it is copied behind our file meta by the kernel and
            # hashed on a writer thread, both starting at once, named from the
            # command's UIDs (which check_header requires to equal the
            # dataset's); validation runs meanwhile and decides if it is kept.
            received = received_region(event.dataset_path)
            pending = self.spool.begin_copy(encode_file_meta(
                str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID),
                str(syntax), calling_ae), *received)
            try:
                digest = self.spool.digest(*received)
                return self._validate_and_accept(pending, received, digest, syntax, request,
                                                 calling_ae, bound, event.assoc)
            except BaseException:
                pending.abort()
                raise
        except OSError as exc:
            bound.error("store_failed_io", error=str(exc))
            return Refusal(status.OUT_OF_RESOURCES, f"storage error: {exc.strerror}").as_dataset()
        except Exception as exc:
            # A bug or an input no check foresaw: the sender gets a named
            # failure it can report, the log gets the traceback, once.
            bound.exception("store_failed_unexpected", error=f"{type(exc).__name__}: {exc}")
            return Refusal(status.PROCESSING_FAILURE,
                           f"node error {type(exc).__name__}; nothing stored").as_dataset()

    def _validate_and_accept(self, pending: PendingWrite, received: tuple[Path, int, int],
                             digest: Future[str], syntax: UID, request: Any, calling_ae: str,
                             bound: Any, assoc: Any) -> int | Dataset:
        path, offset, length = received
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                parsed = parse_instance(fh, syntax, length)
        except Exception as exc:  # any parse failure is the peer's malformed data
            pending.abort()
            bound.warning("store_refused_unparsable", error=str(exc))
            return Refusal(status.CANNOT_UNDERSTAND, f"unparsable data set: {exc}").as_dataset()
        refusal = check_header(parsed, request)
        if refusal is not None:
            pending.abort()
            bound.warning("store_refused", status=status.describe(refusal.status),
                          reason=refusal.comment)
            return refusal.as_dataset()
        return self._accept(pending, digest, parsed.header, calling_ae, bound, assoc)

    def _accept(self, pending: PendingWrite, digest_of: Future[str], header: Dataset,
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
        digest = digest_of.result()
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
