"""What a C-STORE must carry before the node answers Success, and duplicates under load.

Every malformed instance gets its own named status and an ErrorComment, and
leaves nothing in the spool or the ledger; five scanners sending the same
instances at once leave one row and one file per instance.
"""

from __future__ import annotations

import re
import sqlite3
import struct
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from oncoseg_node.dicom import status
from oncoseg_node.durable import TMP_SUFFIX
from oncoseg_node.intake.handlers import StoreHandlers
from oncoseg_node.intake.spool import Spool
from oncoseg_node.intake.transport import Receiver
from oncoseg_node.ledger import Ledger
from tests.ctfactory import encode, series
from tests.peers import DCMTK_ENV, require, send_raw

pytestmark = pytest.mark.peers


@pytest.fixture
def node(make_config):
    started: list[Receiver] = []

    def start(**series_overrides):
        cfg = make_config(series=series_overrides) if series_overrides else make_config()
        ledger = Ledger(cfg.ledger_path)
        spool = Spool(cfg.spool_dir)
        receiver = Receiver(cfg.node, StoreHandlers(cfg.node, cfg.series, spool, ledger))
        receiver.start()
        started.append(receiver)
        return receiver, ledger, spool

    yield start
    for receiver in started:
        receiver.stop_accepting()


def send(port: int, datasets: list[Dataset]) -> list[Dataset]:
    """C-STORE each dataset on one association; the response datasets."""
    ae = AE(ae_title="CTSIM")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="ONCOSEG")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()


def assert_nothing_kept(ledger: Ledger, spool: Spool) -> None:
    assert spool.all_relpaths() == set()
    assert not list(spool.objects.rglob(f"*{TMP_SUFFIX}"))
    assert ledger.open_series() == []
    assert ledger.jobs() == []


def storescu_statuses(files: list[Path], port: int) -> list[str]:
    """Run storescu and return the status word of every Store response it logged."""
    proc = subprocess.run(
        [require("storescu"), "-v", "-aet", "CTSIM", "-aec", "ONCOSEG", "127.0.0.1",
         str(port), *map(str, files)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=180)
    return re.findall(r"Received Store Response \(([^)]*)\)", proc.stdout + proc.stderr)


def test_five_concurrent_senders_of_the_same_instances(node, tmp_path):
    receiver, ledger, spool = node()
    datasets = series(30)
    files = []
    for i, ds in enumerate(datasets):
        path = tmp_path / f"s{i:02d}.dcm"
        path.write_bytes(encode(ds))
        files.append(path)
    with ThreadPoolExecutor(max_workers=5) as pool:
        runs = list(pool.map(lambda _: storescu_statuses(files, receiver.port), range(5)))
    statuses = [s for run in runs for s in run]
    assert len(statuses) == 150 and set(statuses) == {"Success"}, statuses
    assert len(ledger.series_instances(str(datasets[0].SeriesInstanceUID))) == 30
    assert len(spool.all_relpaths()) == 30
    assert spool.all_relpaths() == ledger.known_relpaths()  # no orphan files
    (row,) = ledger.open_series()
    assert row["instance_count"] == 30


def _with(**changes):
    ds = series(1)[0]
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


MALFORMED = {
    "rows_zero": (dict(Rows=0), status.IMAGE_PIXEL_MODULE_INVALID, "Rows"),
    "columns_missing": (dict(Columns=None), status.IMAGE_PIXEL_MODULE_INVALID, "Columns"),
    "bits_allocated_zero": (dict(BitsAllocated=0), status.IMAGE_PIXEL_MODULE_INVALID,
                            "BitsAllocated"),
    "bits_stored_above_allocated": (dict(BitsStored=17), status.IMAGE_PIXEL_MODULE_INVALID,
                                    "BitsStored"),
    "two_samples": (dict(SamplesPerPixel=3), status.IMAGE_PIXEL_MODULE_INVALID,
                    "SamplesPerPixel"),
    "pixel_representation_missing": (dict(PixelRepresentation=None),
                                     status.IMAGE_PIXEL_MODULE_INVALID, "PixelRepresentation"),
    "pixel_data_too_long": (dict(PixelData=bytes(16 * 16 * 2 + 64)),
                            status.PIXEL_DATA_LENGTH_WRONG, "expected 512"),
    "pixel_data_short": (dict(PixelData=bytes(100)), status.PIXEL_DATA_LENGTH_WRONG,
                         "expected 512"),
    "pixel_data_missing": (dict(PixelData=None), status.PIXEL_DATA_MISSING, "PixelData"),
    # HU = stored x slope + intercept: a slope of 0 makes every voxel one value.
    "rescale_slope_zero": (dict(RescaleSlope=0), status.RESCALE_INVALID, "RescaleSlope 0"),
    "rescale_intercept_missing_value": (dict(RescaleIntercept=""), status.RESCALE_INVALID,
                                        "RescaleIntercept"),
    "modality_mr": (dict(Modality="MR"), status.MODALITY_DOES_NOT_MATCH_SOP_CLASS, "MR"),
    # The comment quotes the value: non-ASCII comes back as "?" (LO, default set).
    "modality_non_ascii": (dict(Modality="\u00dcS"), status.MODALITY_DOES_NOT_MATCH_SOP_CLASS,
                           "'?S'"),
    "modality_missing": (dict(Modality=None), status.MODALITY_DOES_NOT_MATCH_SOP_CLASS,
                         "missing"),
    "series_uid_200_chars": (dict(SeriesInstanceUID="1." + "2" * 198),
                             status.UID_NOT_CONFORMANT, "SeriesInstanceUID 200 characters"),
    "study_uid_non_ascii": (dict(StudyInstanceUID="1.2.3.\u00e94"), status.UID_NOT_CONFORMANT,
                            "StudyInstanceUID"),
    "frame_uid_nul": (dict(FrameOfReferenceUID="1.2\x003.4"), status.UID_NOT_CONFORMANT,
                      "FrameOfReferenceUID"),
    "series_uid_leading_zero": (dict(SeriesInstanceUID="1.2.03.4"), status.UID_NOT_CONFORMANT,
                                "SeriesInstanceUID"),
    "series_uid_path": (dict(SeriesInstanceUID="../../x"), status.UID_NOT_CONFORMANT,
                        "SeriesInstanceUID"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_instance_gets_its_named_status_and_nothing_is_kept(node, case):
    changes, expected_status, comment_part = MALFORMED[case]
    receiver, ledger, spool = node()
    (answer,) = send(receiver.port, [_with(**changes)])
    assert int(answer.Status) == expected_status, status.describe(int(answer.Status))
    assert comment_part in str(answer.ErrorComment)
    assert_nothing_kept(ledger, spool)


def test_odd_length_pixel_data_is_refused(node, tmp_path):
    receiver, ledger, spool = node()
    data = encode(series(1)[0])
    # pydicom pads odd values, so the odd element is made by hand: the last
    # element is PixelData (OW, 512 bytes); declare 511 and drop one byte.
    header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 512)
    at = data.rindex(header)
    path = tmp_path / "odd.dcm"
    path.write_bytes(data[:at] + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, 511)
                     + data[at + len(header):-1])
    answer = send_raw(receiver.port, path)
    assert int(answer.Status) == status.PIXEL_DATA_LENGTH_WRONG
    assert "511" in str(answer.ErrorComment)
    assert_nothing_kept(ledger, spool)


def test_unknown_vr_answers_a_named_failure_with_a_comment(node, tmp_path):
    receiver, ledger, spool = node()
    data = encode(series(1)[0])
    # PatientName (0010,0010) is PN: relabel its VR as "ZZ".
    at = data.index(struct.pack("<HH2s", 0x0010, 0x0010, b"PN"))
    path = tmp_path / "zz.dcm"
    path.write_bytes(data[:at + 4] + b"ZZ" + data[at + 6:])
    answer = send_raw(receiver.port, path)
    assert int(answer.Status) == status.ELEMENT_VR_UNKNOWN
    assert "PatientName" in str(answer.ErrorComment) and "ZZ" in str(answer.ErrorComment)
    assert_nothing_kept(ledger, spool)


def test_non_ascii_command_uid_is_refused_by_name(node, tmp_path):
    receiver, ledger, spool = node()
    ds = series(1)[0]
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.\u00e9"
    ds.preamble = b"\0" * 128
    path = tmp_path / "cmd.dcm"
    ds.save_as(path, enforce_file_format=False)
    answer = send_raw(receiver.port, path)
    assert int(answer.Status) == status.UID_NOT_CONFORMANT
    assert "AffectedSOPInstanceUID" in str(answer.ErrorComment)
    assert_nothing_kept(ledger, spool)


def test_unexpected_error_answers_processing_failure_with_one_traceback(node, capfd):
    receiver, ledger, spool = node()
    # A real fault below the handler: the ledger's table vanishes under it.
    with sqlite3.connect(ledger.path) as other:
        other.execute("DROP TABLE instances")
    capfd.readouterr()
    (answer,) = send(receiver.port, series(1))
    assert int(answer.Status) == status.PROCESSING_FAILURE
    assert "OperationalError" in str(answer.ErrorComment)
    out = "".join(capfd.readouterr())
    assert out.count("Traceback") == 1 and "store_failed_unexpected" in out
    assert spool.all_relpaths() == set()
    assert not list(spool.objects.rglob(f"*{TMP_SUFFIX}"))
