"""The whole path with real peers: DCMTK storescu as the CT scanner, the daemon
run as a subprocess, DCMTK storescp as the planning system, dciodvfy as judge."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pydicom
import pytest

from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.ledger import DeliveryState, JobState
from oncoseg_node.rtstruct.reader import rasterize_rtstruct
from tests.conftest import write_config
from tests.daemon import Daemon, wait_until
from tests.peers import dciodvfy, storescp, storescu

pytestmark = pytest.mark.peers

RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("phantom")
    phantom = write_phantom(directory, slices=80, rows=512, columns=512)
    return directory, phantom


def test_series_from_scanner_arrives_at_tps_as_one_valid_rtstruct(tmp_path, phantom_dir):
    series_dir, phantom = phantom_dir
    with storescp(tmp_path / "tps") as tps_port:
        config = write_config(
            tmp_path,
            destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1",
                           "port": tps_port, "retry": {"first_delay_s": 1, "max_delay_s": 5}}],
        )
        daemon = Daemon(config, 0, tmp_path / "daemon.log").start()
        try:
            sent = storescu(series_dir, daemon.port)
            assert sent.returncode == 0, sent.stderr
            received = wait_until(lambda: list((tmp_path / "tps").iterdir()), 120,
                                  f"an RTSTRUCT at the TPS\n{daemon.log()}")
            time.sleep(2.0)  # nothing else may follow
            received = list((tmp_path / "tps").iterdir())
            jobs = wait_until(lambda: [j for j in daemon.status() if j["state"] == JobState.SENT],
                              30, "job state sent")
        finally:
            assert daemon.stop() == 0, daemon.log()
    assert len(received) == 1
    assert len(jobs) == 1 and jobs[0]["deliveries"][0]["state"] == DeliveryState.DELIVERED
    ds = pydicom.dcmread(received[0])
    assert ds.SOPClassUID == RTSTRUCT
    errors, output = dciodvfy(received[0])
    assert errors == [], output
    ref_series = ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0] \
        .RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == phantom.volume.series_instance_uid
    referenced = {item.ReferencedSOPInstanceUID for item in ref_series.ContourImageSequence}
    assert referenced == set(phantom.volume.sop_instance_uids)
    masks = rasterize_rtstruct(ds, phantom.volume)
    assert dice(masks["External"], phantom.truth["External"]) >= 0.95
    assert jobs[0]["series_uid"] == phantom.volume.series_instance_uid


def test_segment_cli_writes_the_same_kind_of_rtstruct_offline(tmp_path, phantom_dir):
    series_dir, phantom = phantom_dir
    config = write_config(tmp_path)
    out = tmp_path / "rs.dcm"
    proc = subprocess.run(
        [sys.executable, "-m", "oncoseg_node.cli", "segment", str(series_dir), "-o", str(out),
         "--config", str(config)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "External" in proc.stdout
    errors, output = dciodvfy(out)
    assert errors == [], output
    ds = pydicom.dcmread(out)
    masks = rasterize_rtstruct(ds, phantom.volume)
    assert dice(masks["External"], phantom.truth["External"]) >= 0.95
    assert ds.ApprovalStatus == "UNAPPROVED"


def test_segment_cli_fails_with_one_line_on_a_missing_folder(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "oncoseg_node.cli", "segment", str(tmp_path / "nope"), "-o",
         str(tmp_path / "x.dcm"), "--config", str(write_config(tmp_path))],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("oncoseg-node: ") and proc.stderr.count("\n") == 1
