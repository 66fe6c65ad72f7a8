"""The Storage SCP against real peers: DCMTK storescu/echoscu and pynetdicom SCUs.

Crafted datasets exercise every refusal; each case checks both the answered
status and that nothing was stored or queued.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage

from oncoseg_node.dicom import status
from oncoseg_node.intake.handlers import StoreHandlers
from oncoseg_node.intake.spool import TMP_SUFFIX, Spool
from oncoseg_node.intake.transport import Receiver
from oncoseg_node.ledger import Ledger
from tests.ctfactory import encode, series
from tests.peers import DCMTK_ENV, require, send_raw, storescu

pytestmark = pytest.mark.peers


@pytest.fixture
def node(make_config, tmp_path):
    def start(**node_overrides):
        cfg = make_config(node=node_overrides) if node_overrides else make_config()
        ledger = Ledger(cfg.ledger_path)
        spool = Spool(cfg.spool_dir)
        handlers = StoreHandlers(cfg.node, cfg.series, spool, ledger)
        receiver = Receiver(cfg.node, handlers)
        receiver.start()
        started.append(receiver)
        return receiver, ledger, spool, handlers

    started: list[Receiver] = []
    yield start
    for receiver in started:
        receiver.stop_accepting()


def write_files(datasets, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        path = directory / f"f{i:03d}.dcm"
        path.write_bytes(encode(ds))
        paths.append(path)
    return paths


def scu_store(port: int, datasets, *, calling="CTSIM", called="ONCOSEG", contexts=None):
    ae = AE(ae_title=calling)
    for ctx in contexts or [CTImageStorage]:
        ae.add_requested_context(ctx, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()


def test_echoscu_verifies(node):
    receiver, *_ = node()
    proc = subprocess.run([require("echoscu"), "-aec", "ONCOSEG", "127.0.0.1",
                           str(receiver.port)], env=DCMTK_ENV, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_storescu_series_is_stored_byte_identical(node, tmp_path):
    receiver, ledger, spool, _ = node()
    datasets = series(6)
    files = write_files(datasets, tmp_path / "send")
    proc = storescu(files, receiver.port)
    assert proc.returncode == 0, proc.stderr
    series_uid = str(datasets[0].SeriesInstanceUID)
    relpaths = ledger.series_instances(series_uid)
    assert len(relpaths) == 6
    sent = {pydicom.dcmread(f).SOPInstanceUID: f for f in files}
    for relpath in relpaths:
        stored = pydicom.dcmread(spool.path(relpath))
        original = pydicom.dcmread(sent[stored.SOPInstanceUID])
        assert stored == original
        assert stored.PixelData == original.PixelData
    assert not list(spool.objects.rglob(f"*{TMP_SUFFIX}"))


def test_identical_duplicate_is_stored_once(node):
    receiver, ledger, spool, _ = node()
    ds = series(1)[0]
    assert scu_store(receiver.port, [ds, ds]) == [status.SUCCESS, status.SUCCESS]
    assert len(ledger.series_instances(str(ds.SeriesInstanceUID))) == 1
    assert len(spool.all_relpaths()) == 1


def test_conflicting_duplicate_keeps_first_by_default(node):
    receiver, ledger, spool, _ = node()
    first = series(1)[0]
    second = pydicom.Dataset(first)
    second.file_meta = first.file_meta
    second.PixelData = bytes(len(first.PixelData))
    assert scu_store(receiver.port, [first, second]) == [status.SUCCESS, status.SUCCESS]
    (relpath,) = ledger.series_instances(str(first.SeriesInstanceUID))
    assert pydicom.dcmread(spool.path(relpath)).PixelData == first.PixelData
    assert len(spool.all_relpaths()) == 1


def test_conflicting_duplicate_replaces_when_configured(make_config, tmp_path):
    cfg = make_config(series={"duplicate_policy": "replace"})
    ledger, spool = Ledger(cfg.ledger_path), Spool(cfg.spool_dir)
    receiver = Receiver(cfg.node, StoreHandlers(cfg.node, cfg.series, spool, ledger))
    receiver.start()
    try:
        first = series(1)[0]
        second = pydicom.Dataset(first)
        second.file_meta = first.file_meta
        second.PixelData = bytes(len(first.PixelData))
        assert scu_store(receiver.port, [first, second]) == [status.SUCCESS] * 2
    finally:
        receiver.stop_accepting()
    (relpath,) = ledger.series_instances(str(first.SeriesInstanceUID))
    assert pydicom.dcmread(spool.path(relpath)).PixelData == second.PixelData
    assert len(spool.all_relpaths()) == 1


@pytest.mark.parametrize("hostile", ["..", "../../x", "a/b", "1.2\x003", "/etc/passwd"])
def test_hostile_uids_are_refused_and_create_nothing(node, tmp_path, hostile):
    receiver, ledger, spool, _ = node()
    ds = series(1)[0]
    ds.SeriesInstanceUID = hostile
    ds.StudyInstanceUID = hostile
    before = set(tmp_path.rglob("*"))
    assert scu_store(receiver.port, [ds]) == [status.UID_NOT_CONFORMANT]
    assert set(tmp_path.rglob("*")) - before <= {spool.root / "ledger-wal"}
    _assert_nothing_stored(ledger, spool)


def test_refusals_are_counted_by_status(node):
    """What /metrics shows as oncoseg_instances_refused_total, over a real association."""
    receiver, ledger, spool, handlers = node()
    good, short, unnamed = series(3)
    short.PixelData = short.PixelData[:100]
    del unnamed.SeriesInstanceUID
    answers = scu_store(receiver.port, [good, short, unnamed, good])
    assert answers == [status.SUCCESS, status.PIXEL_DATA_LENGTH_WRONG,
                       status.CANNOT_UNDERSTAND, status.SUCCESS]
    assert handlers.refused_counts() == {status.PIXEL_DATA_LENGTH_WRONG: 1,
                                         status.CANNOT_UNDERSTAND: 1}
    assert handlers.received == 1  # the identical resend is not a second instance


def _assert_nothing_stored(ledger: Ledger, spool: Spool) -> None:
    assert spool.all_relpaths() == set()
    assert ledger.open_series() == []
    assert ledger.jobs() == []


def test_truncated_pixel_data_is_refused(node):
    receiver, ledger, spool, _ = node()
    ds = series(1)[0]
    ds.PixelData = ds.PixelData[:100]
    assert scu_store(receiver.port, [ds]) == [status.PIXEL_DATA_LENGTH_WRONG]
    _assert_nothing_stored(ledger, spool)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID"])
def test_missing_uid_is_refused(node, keyword):
    receiver, ledger, spool, _ = node()
    ds = series(1)[0]
    delattr(ds, keyword)
    assert scu_store(receiver.port, [ds]) == [status.CANNOT_UNDERSTAND]
    _assert_nothing_stored(ledger, spool)


def test_missing_sop_instance_uid_is_refused(node, tmp_path):
    receiver, ledger, spool, _ = node()
    ds = series(1)[0]
    path = tmp_path / "nouid.dcm"
    path.write_bytes(encode(ds))
    raw = pydicom.dcmread(path)
    del raw.SOPInstanceUID
    raw.preamble = b"\0" * 128
    raw.save_as(path, enforce_file_format=False)
    assert int(send_raw(receiver.port, path).Status) == status.CANNOT_UNDERSTAND
    _assert_nothing_stored(ledger, spool)


def test_command_uid_differing_from_dataset_uid_is_refused(node, tmp_path):
    receiver, ledger, spool, _ = node()
    ds = series(1)[0]
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.999"
    ds.preamble = b"\0" * 128  # written as-is: meta and dataset disagree on purpose
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path, enforce_file_format=False)
    assert int(send_raw(receiver.port, path).Status) == status.CANNOT_UNDERSTAND
    _assert_nothing_stored(ledger, spool)


def test_unsupported_sop_class_refused_at_negotiation_ct_still_works(node):
    receiver, ledger, *_ = node()
    ae = AE(ae_title="CTSIM")
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="ONCOSEG")
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        rejected = {str(cx.abstract_syntax) for cx in assoc.rejected_contexts}
        assert str(MRImageStorage) in rejected and str(MRImageStorage) not in accepted
        ds = series(1)[0]
        assert int(assoc.send_c_store(ds).Status) == status.SUCCESS
    finally:
        assoc.release()
    assert len(ledger.series_instances(str(ds.SeriesInstanceUID))) == 1


def test_unsupported_compressed_transfer_syntax_refused_at_negotiation(node):
    """Only syntaxes the worker can decode are accepted (MPEG video, HTJ2K are not)."""
    from pydicom.uid import HTJ2K, MPEG2MPML

    receiver, *_ = node()
    ae = AE(ae_title="CTSIM")
    ae.add_requested_context(CTImageStorage, [HTJ2K, MPEG2MPML])
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="ONCOSEG")
    try:
        assert not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()


def test_disk_guard_refuses_then_resumes_without_restart(node):
    receiver, ledger, spool, handlers = node()
    ds1, ds2 = series(2)
    # The guard reads real free space per request: raise the floor above it.
    handlers.min_free_bytes = spool.free_bytes() + 10 * 1024**3
    assert scu_store(receiver.port, [ds1]) == [status.OUT_OF_RESOURCES]
    _assert_nothing_stored(ledger, spool)
    handlers.min_free_bytes = 1024 * 1024  # space is available again
    assert scu_store(receiver.port, [ds1, ds2]) == [status.SUCCESS, status.SUCCESS]
    assert len(spool.all_relpaths()) == 2


def _rejection(port: int, calling: str, called: str) -> tuple[int, int, int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_rejected
    primitive = assoc.acceptor.primitive
    return primitive.result, primitive.result_source, primitive.diagnostic


def test_calling_and_called_ae_checks(node):
    receiver, *_ = node(allowed_calling_aets=["CTSIM"])
    assert _rejection(receiver.port, "INTRUDER", "ONCOSEG") == (1, 1, 3)
    assert _rejection(receiver.port, "CTSIM", "SOMEONE") == (1, 1, 7)
    assert scu_store(receiver.port, series(1)) == [status.SUCCESS]


def test_peer_outside_allowed_networks_is_dropped(node):
    receiver, *_ = node(allowed_peers=["10.99.0.0/16"])
    ae = AE(ae_title="CTSIM")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="ONCOSEG")
    assert not assoc.is_established


def test_idle_connections_do_not_block_a_scanner(node):
    receiver, *_ = node(max_associations=4)
    idle = [socket.create_connection(("127.0.0.1", receiver.port)) for _ in range(50)]
    try:
        started = time.monotonic()
        assert scu_store(receiver.port, series(1)) == [status.SUCCESS]
        assert time.monotonic() - started < 5.0
    finally:
        for sock in idle:
            sock.close()


def test_localizer_and_dose_report_are_acknowledged_not_stored(node):
    receiver, ledger, spool, _ = node()
    ds = series(1)[0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    assert scu_store(receiver.port, [ds]) == [status.SUCCESS]
    _assert_nothing_stored(ledger, spool)



@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1",
                                    "1.2.840.10008.1.2.2"])
def test_parse_instance_measures_pixel_bytes_without_reading_them(syntax):
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.uid import UID

    from oncoseg_node.intake.headers import parse_instance

    ds = series(1, size=512)[0]
    uid = UID(syntax)
    stream = DicomBytesIO()
    stream.is_little_endian, stream.is_implicit_VR = uid.is_little_endian, uid.is_implicit_VR
    write_dataset(stream, ds)  # the dataset as it travels in a C-STORE
    raw = stream.getvalue()
    parsed = parse_instance(raw, uid)
    assert "PixelData" not in parsed.header
    assert parsed.header.SOPInstanceUID == ds.SOPInstanceUID
    assert parsed.pixel_bytes == 512 * 512 * 2
    assert parse_instance(raw[:-1000], uid).pixel_bytes == 512 * 512 * 2 - 1000


def test_large_images_from_storescu_are_stored(node, tmp_path):
    receiver, ledger, *_ = node()
    datasets = series(3, size=512)
    assert storescu(write_files(datasets, tmp_path / "big"), receiver.port).returncode == 0
    assert len(ledger.series_instances(str(datasets[0].SeriesInstanceUID))) == 3
