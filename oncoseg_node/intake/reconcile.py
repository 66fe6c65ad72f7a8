"""At start, before the listener binds: every spooled instance has a ledger row again.

A file in the spool was acknowledged to its sender (or was about to be), so it
is never deleted because the ledger does not know it. When the ledger was
lost, emptied or rolled back (a damaged WAL), each file without a row is
registered again from its own header, the way the C-STORE handler recorded it
(the calling AE from the file meta the node wrote, the digest of the dataset
as sent), so its series is closed by the assembler and contoured once. How
its associations ended is not known any more, so the series is judged as an
interrupted one (``series.interrupted_wait_s`` unless its counts say it is
whole): it may have been cut off when the ledger was lost.
A file that cannot be read as a spooled CT instance is moved to
``<spool>/quarantine/`` with a log line, for a person to look at. A second
copy of an instance whose row already names another file (left by a crash
between recording a replacing duplicate and removing the spare) is removed,
as the handler would have done.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field

import pydicom
import structlog
from pydicom.errors import InvalidDicomError

from oncoseg_node.durable import fsync_dir, private_dir
from oncoseg_node.intake.headers import int_or_none, slice_position
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import Ledger
from oncoseg_node.ledger.intake import ENDED_BY_RECONCILED

log = structlog.get_logger("oncoseg_node.intake.reconcile")

QUARANTINE = "quarantine"
PREAMBLE_AND_PREFIX = 132
GROUP_LENGTH_ELEMENT = 12  # (0002,0000) UL, explicit VR: tag 4, VR 2, length 2, value 4
REQUIRED = ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


class UnreadableInstance(ValueError):
    """A spooled file that is not a readable DICOM instance with its UIDs."""


@dataclass
class ReconcileReport:
    registered: int = 0
    series: set[str] = field(default_factory=set)
    spares_removed: int = 0
    quarantined: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SpooledInstance:
    header: pydicom.Dataset
    calling_ae: str | None
    sha256: str
    size: int


def read_spooled(data: bytes) -> SpooledInstance:
    """Parse a spool file (file meta + dataset as received); UnreadableInstance if it is not."""
    if data[128:PREAMBLE_AND_PREFIX] != b"DICM":
        raise UnreadableInstance("no DICM prefix")
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        group_length = int(ds.file_meta.FileMetaInformationGroupLength)
    except (InvalidDicomError, AttributeError, ValueError, TypeError, EOFError,
            OverflowError, KeyError) as exc:
        raise UnreadableInstance(f"unreadable: {exc}") from exc
    missing = [k for k in REQUIRED if not str(ds.get(k, "") or "").strip()]
    if missing:
        raise UnreadableInstance(f"missing {', '.join(missing)}")
    offset = PREAMBLE_AND_PREFIX + GROUP_LENGTH_ELEMENT + group_length
    ae = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "").strip() or None
    return SpooledInstance(ds, ae, hashlib.sha256(data[offset:]).hexdigest(), len(data))


def reconcile(spool: Spool, ledger: Ledger) -> ReconcileReport:
    """Register or set aside every spool file the ledger has no row for."""
    report = ReconcileReport()
    for relpath in sorted(spool.all_relpaths() - ledger.known_relpaths()):
        path = spool.path(relpath)
        try:
            instance = read_spooled(path.read_bytes())
        except (OSError, UnreadableInstance) as exc:
            _quarantine(spool, relpath, str(exc), report)
            continue
        header = instance.header
        result = ledger.record_instance(
            sop_instance_uid=str(header.SOPInstanceUID),
            series_uid=str(header.SeriesInstanceUID),
            study_uid=str(header.StudyInstanceUID), sop_class_uid=str(header.SOPClassUID),
            relpath=relpath, sha256=instance.sha256, size=instance.size,
            calling_ae=instance.calling_ae,
            description=str(header.get("SeriesDescription", "") or ""),
            instance_number=int_or_none(header.get("InstanceNumber")),
            images_in_acquisition=int_or_none(header.get("ImagesInAcquisition")),
            slice_position=slice_position(header))
        if result.spare_relpath is not None:
            spool.remove(result.spare_relpath)
            report.spares_removed += 1
            log.info("spool_spare_copy_removed", relpath=result.spare_relpath,
                     sop_instance_uid=str(header.SOPInstanceUID))
        if result.spare_relpath != relpath:
            report.registered += 1
            report.series.add(str(header.SeriesInstanceUID))
    if report.series:
        ledger.association_ended(sorted(report.series), ENDED_BY_RECONCILED)
    if report.registered or report.quarantined:
        log.warning("spool_reconciled", registered=report.registered,
                    series=len(report.series), quarantined=len(report.quarantined),
                    spares_removed=report.spares_removed, audit=True)
    return report


def _quarantine(spool: Spool, relpath: str, reason: str, report: ReconcileReport) -> None:
    folder = private_dir(spool.root / QUARANTINE)
    source = spool.path(relpath)
    target = folder / source.name
    os.replace(source, target)
    fsync_dir(folder)
    fsync_dir(source.parent)
    report.quarantined.append(relpath)
    log.warning("spool_file_quarantined", relpath=relpath, moved_to=str(target), reason=reason)
