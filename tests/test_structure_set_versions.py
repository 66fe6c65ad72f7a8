"""A series that grows after it was contoured: version 2 names version 1 as its predecessor.

Real peers: DCMTK storescu as the scanner, the daemon as a subprocess,
DCMTK storescp as the planning system and dciodvfy as the judge of the
version-2 structure set.
"""

from __future__ import annotations

import copy
from datetime import datetime

import pydicom
import pytest
from pydicom.uid import generate_uid

from oncoseg_node.commissioning.phantom import write_phantom
from tests.conftest import write_config
from tests.daemon import Daemon, wait_until
from tests.peers import dciodvfy, storescp, storescu

pytestmark = pytest.mark.peers


def _received(tps) -> list[pydicom.Dataset]:  # noqa: ANN001
    return sorted((pydicom.dcmread(p) for p in tps.iterdir()),
                  key=lambda ds: str(ds.StructureSetLabel))


def test_second_version_names_its_predecessor_and_passes_dciodvfy(tmp_path):
    ct = tmp_path / "ct"
    phantom = write_phantom(ct, slices=10, rows=128, columns=128, pixel_spacing=(3.9, 3.9))
    # The late slice the scanner sends after the series was contoured: one more
    # slice past the last, same series.
    late = copy.deepcopy(phantom.datasets[-1])
    step = phantom.volume.positions[-1] - phantom.volume.positions[-2]
    late.ImagePositionPatient = [f"{v:.4f}" for v in phantom.volume.positions[-1] + step]
    late.SliceLocation = f"{float(late.ImagePositionPatient[2]):.4f}"
    late.InstanceNumber = len(phantom.datasets) + 1
    late.SOPInstanceUID = generate_uid()
    late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
    late_path = tmp_path / "late" / "CT000011.dcm"
    late_path.parent.mkdir()
    late.save_as(late_path, enforce_file_format=True)

    tps = tmp_path / "tps"
    with storescp(tps) as tps_port:
        config = write_config(
            tmp_path,
            destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1",
                           "port": tps_port, "retry": {"first_delay_s": 1, "max_delay_s": 5}}])
        daemon = Daemon(config, 0, tmp_path / "daemon.log").start()
        try:
            assert storescu(ct, daemon.port).returncode == 0
            wait_until(lambda: len(list(tps.iterdir())) == 1, 120,
                       f"version 1 at the TPS\n{daemon.log()}")
            assert storescu([late_path], daemon.port).returncode == 0
            wait_until(lambda: len(list(tps.iterdir())) == 2, 120,
                       f"version 2 at the TPS\n{daemon.log()}")
        finally:
            assert daemon.stop() == 0, daemon.log()
    first, second = _received(tps)
    status = daemon.status()
    jobs = {job["version"]: job["job"] for job in status}
    for job in status:  # what a physicist reads in `status --json`
        assert job["patient_id"] == "PHANTOM001" and job["patient_name"] == "Phantom^Synthetic"
        assert job["series_description"] == "Phantom thorax HFS" and job["protocol"] == "thorax"
        assert datetime.fromisoformat(job["created_at"]).tzinfo is not None
        assert datetime.fromisoformat(job["finished_at"]) >= \
            datetime.fromisoformat(job["created_at"])
        assert set(job["stage_seconds"]) == {"load", "segment", "write"}
        (delivery,) = job["deliveries"]
        assert delivery["state"] == "delivered" and delivery["next_attempt_at"] is None
        datetime.fromisoformat(delivery["delivered_at"])
    text = daemon.cli("status").stdout
    assert "patient Phantom^Synthetic (PHANTOM001); series 'Phantom thorax HFS'" in text
    assert "tps: delivered after 1 attempt" in text and "stages: load" in text
    assert str(first.StructureSetLabel) == f"AUTO J{jobs[1]} V1"
    assert str(second.StructureSetLabel) == f"AUTO J{jobs[2]} V2"
    assert "PredecessorStructureSetSequence" not in first
    (predecessor,) = second.PredecessorStructureSetSequence
    assert predecessor.ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert predecessor.ReferencedSOPClassUID == first.SOPClassUID
    assert second.SOPInstanceUID != first.SOPInstanceUID
    # the engine here is the classical one: the thorax protocol's SAM3 organs are absent,
    # and the file says so
    assert "Not found (not in this set): " in second.StructureSetDescription
    assert "Heart" in second.StructureSetDescription
    errors, output = dciodvfy(tps / next(p.name for p in tps.iterdir()
                                         if pydicom.dcmread(p).SOPInstanceUID
                                         == second.SOPInstanceUID))
    assert errors == [], output


def test_released_series_names_the_overridden_finding_and_the_absent_structures(tmp_path):
    from oncoseg_node.config import load_config
    from oncoseg_node.contouring.engines.registry import build_engines
    from oncoseg_node.contouring.pipeline import contour, load_ct_series
    from oncoseg_node.contouring.protocols import load_protocols
    from oncoseg_node.rtstruct.draft import write_structure_set
    from oncoseg_node.rtstruct.profiles import get_profile

    write_phantom(tmp_path / "ct", slices=10, rows=128, columns=128, pixel_spacing=(3.9, 3.9))
    paths = sorted((tmp_path / "ct").iterdir())
    del paths[4]  # a slice lost on the way: the geometry gate holds the series
    volume, report = load_ct_series(paths, override_geometry=True)
    assert report.overridden
    config = load_config(write_config(tmp_path))
    protocols = load_protocols(config.protocols)
    engines = build_engines(config.engine)
    contoured = contour(volume, report, protocols.by_name("thorax"), engines)
    out = tmp_path / "rs.dcm"
    ds = write_structure_set(contoured, protocols, engines, get_profile("generic"), out,
                             label="AUTO J7 V1")
    description = str(ds.StructureSetDescription)
    assert f"despite the geometry finding: {report.overridden}" in description
    absent = [r.name for r in contoured.results if r.absent]
    assert absent and f"Not found (not in this set): {', '.join(absent)}." in description
    assert description.startswith("Automatic contours, not approved")
    errors, output = dciodvfy(out)
    assert errors == [], output
