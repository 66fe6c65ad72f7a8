"""Completeness through the real daemon: DCMTK storescu and a pynetdicom scanner that
aborts or resets mid-series, DCMTK storescp as the planning system, kill -9 restarts."""

from __future__ import annotations

import json
import socket
import struct
import time
from pathlib import Path

import pydicom
import pydicom.errors
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from oncoseg_node.commissioning.phantom import write_phantom
from tests.conftest import write_config
from tests.daemon import Daemon, wait_until
from tests.peers import storescp, storescu

pytestmark = pytest.mark.peers

SMALL = dict(rows=128, columns=128, pixel_spacing=(3.5, 3.5), slice_thickness=2.5)


def phantom_files(directory: Path, slices: int, *, images_in_acquisition: bool) -> list[Path]:
    """A small thorax phantom on disk, in InstanceNumber order."""
    write_phantom(directory, slices=slices, **SMALL)
    paths = sorted(directory.iterdir())
    for path in paths:
        ds = pydicom.dcmread(path)
        if images_in_acquisition:
            ds.ImagesInAcquisition = slices
        ds.save_as(path, enforce_file_format=True)
    return paths


def start(tmp_path: Path, tps_port: int, node: dict | None = None, **series) -> Daemon:
    config = write_config(
        tmp_path, node=node or {}, series={"quiet_period_s": 1, **series},
        destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1",
                       "port": tps_port, "retry": {"first_delay_s": 1, "max_delay_s": 2}}])
    return Daemon(config, 0, tmp_path / "daemon.log").start()


def send_then_interrupt(port: int, paths: list[Path], how: str) -> None:
    """Send ``paths`` one by one (each acknowledged), then end with an A-ABORT or a TCP reset."""
    ae = AE(ae_title="CTSIM")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="ONCOSEG")
    assert assoc.is_established
    for path in paths:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0x0000
    if how == "abort":
        assoc.abort()
        return
    if how == "stall":  # hold the association open, silent, past the node's network timeout
        wait_until(lambda: not assoc.is_established, 30, "the node to abort the association")
        return
    raw = assoc.dul.socket.socket
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()  # RST: the connection is reset, no A-ABORT, no release
    assoc.dul.kill_dul()


def structure_sets(tps: Path) -> list[pydicom.Dataset]:
    """What the planning system holds; a file storescp is still writing counts once whole."""
    found = []
    for path in sorted(tps.iterdir()) if tps.exists() else []:
        try:
            found.append(pydicom.dcmread(path))
        except (pydicom.errors.InvalidDicomError, EOFError, OSError):
            return []  # still being written: ask again
    return found


def referenced(ds: pydicom.Dataset) -> set[str]:
    series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0]
    return {item.ReferencedSOPInstanceUID for item in series.ContourImageSequence}


def uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


@pytest.mark.parametrize("how", ["abort", "reset"])
@pytest.mark.parametrize("count_evidence", [True, False], ids=["IIA", "no-IIA"])
def test_half_a_series_then_abort_or_reset_sends_nothing_until_the_rest(tmp_path, how,
                                                                        count_evidence):
    paths = phantom_files(tmp_path / "ct", 100, images_in_acquisition=count_evidence)
    with storescp(tmp_path / "tps") as tps_port:
        daemon = start(tmp_path, tps_port)
        try:
            send_then_interrupt(daemon.port, paths[:50], how)
            wait_until(lambda: "association_ended" in daemon.log(), 30, "the end logged")
            time.sleep(6)  # six quiet periods: the old node sent 50 slices by now
            assert structure_sets(tmp_path / "tps") == []
            assert daemon.status() == []
            assert '"interrupted": true' in daemon.log()
            assert storescu(paths[50:], daemon.port).returncode == 0
            (ds,) = wait_until(lambda: structure_sets(tmp_path / "tps"), 120,
                               f"the structure set\n{daemon.log()}")
            time.sleep(3)  # nothing else may follow
            assert len(structure_sets(tmp_path / "tps")) == 1
        finally:
            assert daemon.stop() == 0, daemon.log()
    assert referenced(ds) == uids(paths)
    (job,) = daemon.status()  # the CLI reads the ledger; the daemon need not run
    assert job["state"] == "sent" and job["version"] == 1


def test_series_with_slices_missing_is_held_with_its_reason_then_released(tmp_path):
    paths = phantom_files(tmp_path / "ct", 100, images_in_acquisition=True)
    with storescp(tmp_path / "tps") as tps_port:
        daemon = start(tmp_path, tps_port, interrupted_wait_s=3)
        try:
            send_then_interrupt(daemon.port, paths[:50], "abort")
            (job,) = wait_until(lambda: [j for j in daemon.status() if j["state"] == "held"],
                                60, f"a held job\n{daemon.log()}")
            assert job["reason"].startswith(
                "incomplete: ImagesInAcquisition is 100: 50 missing, short run at the end")
            assert "held" in daemon.cli("status").stdout
            time.sleep(2)
            assert structure_sets(tmp_path / "tps") == []
            released = daemon.cli("release", str(job["job"]))
            assert released.returncode == 0, released.stderr
            (ds,) = wait_until(lambda: structure_sets(tmp_path / "tps"), 120,
                               f"the released structure set\n{daemon.log()}")
        finally:
            assert daemon.stop() == 0, daemon.log()
    assert referenced(ds) == uids(paths[:50])
    assert '"event": "series_held_incomplete"' in daemon.log()
    assert ("Released by an operator despite incomplete: ImagesInAcquisition is 100: "
            "50 missing") in ds.StructureSetDescription
    (job,) = daemon.status()
    assert job["override_finding"].startswith("incomplete: ImagesInAcquisition is 100")


@pytest.mark.parametrize("rule", ["IIA", "whole_series_sender"])
def test_released_series_with_whole_counts_is_sent_without_the_quiet_wait(tmp_path, rule):
    paths = phantom_files(tmp_path / "ct", 30, images_in_acquisition=rule == "IIA")
    senders = ["CTSIM"] if rule == "whole_series_sender" else []
    with storescp(tmp_path / "tps") as tps_port:
        daemon = start(tmp_path, tps_port, quiet_period_s=600, whole_series_senders=senders)
        try:
            assert storescu(tmp_path / "ct", daemon.port).returncode == 0
            # far inside the 600 s quiet period
            (ds,) = wait_until(lambda: structure_sets(tmp_path / "tps"), 120,
                               f"the structure set\n{daemon.log()}")
        finally:
            assert daemon.stop() == 0, daemon.log()
    assert referenced(ds) == uids(paths)
    assert "complete without waiting" in daemon.log()


def test_late_instance_after_a_complete_release_makes_a_new_version(tmp_path):
    paths = phantom_files(tmp_path / "ct", 20, images_in_acquisition=True)
    with storescp(tmp_path / "tps") as tps_port:
        daemon = start(tmp_path, tps_port, quiet_period_s=2)
        try:
            assert storescu(paths, daemon.port).returncode == 0
            wait_until(lambda: len(structure_sets(tmp_path / "tps")) >= 1, 120,
                       f"a structure set\n{daemon.log()}")
            ds = pydicom.dcmread(paths[0])
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.InstanceNumber = 21
            ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1],
                                       float(pydicom.dcmread(paths[-1]).ImagePositionPatient[2])
                                       + 2.5]
            late = tmp_path / "late.dcm"
            ds.save_as(late, enforce_file_format=True)
            assert storescu([late], daemon.port).returncode == 0
            wait_until(lambda: len(structure_sets(tmp_path / "tps")) >= 2, 120,
                       f"a second structure set\n{daemon.log()}")
        finally:
            assert daemon.stop() == 0, daemon.log()
    versions = sorted(j["version"] for j in daemon.status())
    assert versions == [1, 2]


def test_time_the_node_was_down_is_not_quiet_time(tmp_path):
    paths = phantom_files(tmp_path / "ct", 7, images_in_acquisition=False)
    with storescp(tmp_path / "tps") as tps_port:
        daemon = start(tmp_path, tps_port, quiet_period_s=10)
        assert storescu(paths, daemon.port).returncode == 0
        daemon.kill()
        time.sleep(12)  # down longer than the quiet period
        daemon.start()
        try:
            time.sleep(3)
            assert daemon.status() == [], "the quiet period started again at restart"
            wait_until(lambda: structure_sets(tmp_path / "tps"), 120,
                       f"the structure set\n{daemon.log()}")
        finally:
            assert daemon.stop() == 0, daemon.log()


def test_a_sender_silent_past_the_network_timeout_interrupts_its_series(tmp_path):
    paths = phantom_files(tmp_path / "ct", 20, images_in_acquisition=False)
    with storescp(tmp_path / "tps") as tps_port:
        # The quiet period is longer than the network timeout: a silent
        # association is aborted (and its series interrupted) before it ends.
        daemon = start(tmp_path, tps_port, node={"network_timeout_s": 2}, quiet_period_s=4)
        try:
            send_then_interrupt(daemon.port, paths[:10], "stall")
            ended = wait_until(lambda: [json.loads(line) for line in daemon.log().splitlines()
                                        if '"association_ended"' in line], 30, "the end")
            assert ended[0]["interrupted"] is True, ended
            time.sleep(8)  # two quiet periods after the abort
            assert daemon.status() == [] and structure_sets(tmp_path / "tps") == []
        finally:
            assert daemon.stop() == 0, daemon.log()
