"""Start-up reconciliation: spool files without a ledger row are registered or set aside."""

from __future__ import annotations

import hashlib

import structlog
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian

from oncoseg_node.dicom.filemeta import encode_file_meta
from oncoseg_node.intake.reconcile import QUARANTINE, reconcile
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import Ledger, SeriesState
from oncoseg_node.ledger.intake import ENDED_BY_RECONCILED
from tests.ctfactory import series


def dataset_bytes(ds) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return fp.getvalue()


def spool_as_received(spool: Spool, ds, calling_ae: str = "CTSIM") -> tuple[str, str]:
    """Write ``ds`` the way the C-STORE handler does: our file meta, then the dataset as sent."""
    stream = dataset_bytes(ds)
    meta = encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                            ExplicitVRLittleEndian, calling_ae)
    pending = spool.begin([meta, stream])
    digest = hashlib.sha256(stream).hexdigest()
    return pending.commit(digest).relpath, digest


def test_files_of_a_lost_ledger_are_registered_as_the_handler_recorded_them(tmp_path):
    spool = Spool(tmp_path / "spool")
    datasets = series(3)
    written = [spool_as_received(spool, ds) for ds in datasets]
    ledger = Ledger(tmp_path / "ledger.sqlite3")  # a new, empty ledger
    report = reconcile(spool, ledger)
    assert report.registered == 3 and report.quarantined == []
    series_uid = str(datasets[0].SeriesInstanceUID)
    assert report.series == {series_uid}
    assert sorted(ledger.series_instances(series_uid)) == sorted(r for r, _ in written)
    for ds, (relpath, digest) in zip(datasets, written, strict=True):
        record = ledger.find_instance(str(ds.SOPInstanceUID))
        assert record.relpath == relpath and record.sha256 == digest
    (row,) = ledger.open_series()  # its quiet period runs: contoured once it closes
    assert row["calling_ae"] == "CTSIM" and row["state"] == SeriesState.OPEN
    assert not row["receiving"] and row["ended_by"] == ENDED_BY_RECONCILED
    evidence = ledger.series_evidence(series_uid)
    assert evidence.numbers == [1, 2, 3] and evidence.positions == [0.0, 2.5, 5.0]
    assert reconcile(spool, ledger).registered == 0  # nothing twice


def test_unreadable_files_go_to_quarantine_with_a_log_line(tmp_path):
    spool = Spool(tmp_path / "spool")
    good, _ = spool_as_received(spool, series(1)[0])
    junk = spool.store(b"\0" * 128 + b"DICM" + b"\xff" * 40).relpath
    text = spool.store(b"not DICOM at all").relpath
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    with structlog.testing.capture_logs() as logs:
        report = reconcile(spool, ledger)
    assert sorted(report.quarantined) == sorted([junk, text])
    assert report.registered == 1
    quarantine = tmp_path / "spool" / QUARANTINE
    assert sorted(p.name for p in quarantine.iterdir()) == sorted(
        p.rsplit("/", 1)[1] for p in (junk, text))
    assert spool.all_relpaths() == {good}
    moved = [e for e in logs if e["event"] == "spool_file_quarantined"]
    assert {e["relpath"] for e in moved} == {junk, text}
    assert all(e["reason"] for e in moved)


def test_a_second_copy_of_a_recorded_instance_is_removed(tmp_path):
    spool = Spool(tmp_path / "spool")
    ds = series(1)[0]
    kept, _ = spool_as_received(spool, ds)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    assert reconcile(spool, ledger).registered == 1
    spare, _ = spool_as_received(spool, ds)  # a crash before the handler removed it
    report = reconcile(spool, ledger)
    assert report.registered == 0 and report.spares_removed == 1
    assert spool.all_relpaths() == {kept}
    assert ledger.find_instance(str(ds.SOPInstanceUID)).relpath == kept
