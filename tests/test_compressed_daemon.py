"""A hospital router forwarding compressed CT: Orthanc -> the daemon -> DCMTK storescp.

The same phantom series is sent three times under new UIDs: uncompressed by
storescu, then as JPEG 2000 lossless and as JPEG lossless (SV1) from
Orthanc, which holds them as uploaded and forwards them without transcoding.
Each must give one structure set referencing every image, with contours
identical to the uncompressed series'.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, generate_uid

from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.ledger import JobState
from tests.conftest import write_config
from tests.daemon import Daemon, wait_until
from tests.orthanc_peer import Orthanc, orthanc
from tests.peers import DCMTK_ENV, free_port, require, storescp, storescu

pytestmark = pytest.mark.peers

SLICES = 24


def renamed_copy(source: Path, target: Path, tag: int) -> list[str]:
    """The series in ``source`` under a new Series and SOP Instance UIDs (same study,
    frame of reference and pixels); returns the new SOP Instance UIDs."""
    target.mkdir(parents=True)
    uids = []
    for path in sorted(source.glob("CT*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(ds.SeriesInstanceUID), str(tag)])
        ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(ds.SOPInstanceUID), str(tag)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(target / path.name, enforce_file_format=True)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def compress_folder(folder: Path, syntax: str) -> None:
    for path in sorted(folder.glob("CT*.dcm")):
        if syntax == JPEGLosslessSV1:
            subprocess.run([require("dcmcjpeg"), "+e1", str(path), str(path)], env=DCMTK_ENV,
                           check=True, capture_output=True, timeout=60)
        else:  # DCMTK has no JPEG 2000 encoder: pydicom with pylibjpeg-openjpeg
            ds = pydicom.dcmread(path)
            ds.compress(syntax, encoding_plugin="pylibjpeg", generate_instance_uid=False)
            ds.save_as(path, enforce_file_format=True)


def post(peer: Orthanc, path: str, body: bytes) -> object:
    request = urllib.request.Request(f"http://127.0.0.1:{peer.http_port}{path}", data=body,
                                     method="POST")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def forward(peer: Orthanc, folder: Path) -> None:
    """Upload the files to Orthanc as they are, then have it C-STORE the series to the node."""
    series_ids = set()
    for path in sorted(folder.glob("CT*.dcm")):
        answer = post(peer, "/instances", path.read_bytes())
        assert isinstance(answer, dict)
        series_ids.add(answer["ParentSeries"])
    (series_id,) = series_ids
    answer = post(peer, "/modalities/oncoseg/store",
                  json.dumps({"Resources": [series_id], "Synchronous": True}).encode())
    assert isinstance(answer, dict) and answer.get("FailedInstancesCount", 0) == 0, answer


def contours_by_roi(rtstruct: pydicom.Dataset) -> dict[str, list[tuple[float, ...]]]:
    names = {roi.ROINumber: roi.ROIName for roi in rtstruct.StructureSetROISequence}
    out = {}
    for roi in rtstruct.ROIContourSequence:
        out[names[roi.ReferencedROINumber]] = sorted(
            tuple(float(v) for v in c.ContourData) for c in roi.get("ContourSequence", []))
    return out


def referenced_images(rtstruct: pydicom.Dataset) -> set[str]:
    series = (rtstruct.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
              .RTReferencedSeriesSequence[0])
    return {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence}


def test_orthanc_forwarding_jpeg2000_and_jpeg_lossless_gives_identical_structure_sets(tmp_path):
    plain = tmp_path / "plain"
    write_phantom(plain, slices=SLICES, rows=256, columns=256, pixel_spacing=(1.5, 1.5))
    sent_uids = {"plain": [str(pydicom.dcmread(p).SOPInstanceUID)
                           for p in sorted(plain.glob("CT*.dcm"))]}
    for tag, syntax in ((1, JPEG2000Lossless), (2, JPEGLosslessSV1)):
        folder = tmp_path / str(syntax)
        sent_uids[str(syntax)] = renamed_copy(plain, folder, tag)
        compress_folder(folder, syntax)

    node_port = free_port()
    tps_dir = tmp_path / "tps"
    with storescp(tps_dir) as tps_port, orthanc(
            tmp_path / "orthanc",
            modalities={"oncoseg": ("ONCOSEG", "127.0.0.1", node_port)}) as router:
        config = write_config(
            tmp_path, node={"port": node_port}, series={"quiet_period_s": 2},
            destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1",
                           "port": tps_port, "retry": {"first_delay_s": 1, "max_delay_s": 5}}])
        daemon = Daemon(config, node_port, tmp_path / "daemon.log").start()
        try:
            assert storescu(plain, node_port).returncode == 0
            forward(router, tmp_path / str(JPEG2000Lossless))
            forward(router, tmp_path / str(JPEGLosslessSV1))
            jobs = wait_until(
                lambda: (lambda js: js if len(js) == 3 and all(
                    j["state"] == JobState.SENT for j in js) else None)(daemon.status()),
                300, f"three structure sets sent\n{daemon.log()[-3000:]}")
        finally:
            assert daemon.stop() == 0, daemon.log()[-3000:]
    assert len(jobs) == 3
    stored_syntaxes = sorted(
        str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        for p in (tmp_path / "state" / "spool" / "objects").rglob("*.dcm"))
    assert stored_syntaxes.count(JPEG2000Lossless) == SLICES  # stored as Orthanc sent them
    assert stored_syntaxes.count(JPEGLosslessSV1) == SLICES

    received = [pydicom.dcmread(p) for p in sorted(tps_dir.iterdir())]
    assert len(received) == 3
    by_images = {frozenset(referenced_images(ds)): ds for ds in received}
    structure_sets = {}
    for name, uids in sent_uids.items():
        assert frozenset(uids) in by_images, f"{name}: no structure set references every image"
        structure_sets[name] = contours_by_roi(by_images[frozenset(uids)])
    reference = structure_sets["plain"]
    assert reference and any(reference.values())
    assert structure_sets[str(JPEG2000Lossless)] == reference
    assert structure_sets[str(JPEGLosslessSV1)] == reference


def test_a_frame_that_fails_to_decode_holds_the_job_with_its_reason(tmp_path):
    folder = tmp_path / "j2k"
    write_phantom(folder, slices=10, rows=128, columns=128, pixel_spacing=(3.0, 3.0))
    compress_folder(folder, JPEG2000Lossless)
    broken = sorted(folder.glob("CT*.dcm"))[4]
    ds = pydicom.dcmread(broken)
    start = ds.PixelData.index(b"\xff\x4f\xff\x51")  # the codestream's SOC and SIZ markers
    ds.PixelData = ds.PixelData[:start + 60] + bytes(len(ds.PixelData) - start - 60)
    ds.save_as(broken, enforce_file_format=True)
    daemon = Daemon(write_config(tmp_path, series={"quiet_period_s": 1}), 0,
                    tmp_path / "daemon.log").start()
    try:
        proc = subprocess.run(
            [require("storescu"), "-R", "-xv", "-aet", "CTSIM", "-aec", "ONCOSEG", "127.0.0.1",
             str(daemon.port), *map(str, sorted(folder.glob("CT*.dcm")))],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "E:" not in proc.stderr, proc.stderr
        (job,) = wait_until(
            lambda: [j for j in daemon.status() if j["state"] not in (JobState.QUEUED,
                                                                       JobState.RUNNING)],
            120, f"the job to settle\n{daemon.log()[-3000:]}")
    finally:
        assert daemon.stop() == 0
    assert job["state"] == JobState.HELD
    assert "pixel data" in job["reason"] and str(ds.SOPInstanceUID) in job["reason"]
    assert "JPEG 2000" in job["reason"]
