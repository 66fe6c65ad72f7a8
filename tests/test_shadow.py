"""Shadow mode through the daemon: a trial protocol reaches only the shadow destination."""

from __future__ import annotations

import pydicom
import pytest

from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.ledger import JobState
from tests.conftest import write_config
from tests.daemon import Daemon, wait_until
from tests.peers import storescp, storescu

pytestmark = pytest.mark.peers

PROTOCOLS = """
structures:
  External: {color: [0, 255, 0], type: EXTERNAL}
  Bones: {color: [255, 255, 0]}
protocols:
  - name: trial
    priority: 10
    shadow: true
    match: {attributes: {SeriesDescription: trial}}
    structures: [External, Bones]
  - name: clinical
    structures: [External]
fallback: clinical
"""


def test_shadow_protocol_goes_only_to_the_shadow_destination(tmp_path):
    (tmp_path / "protocols.yaml").write_text(PROTOCOLS)
    with storescp(tmp_path / "tps") as tps, storescp(tmp_path / "test-tps",
                                                     aet="TESTTPS") as test_tps:
        config = write_config(
            tmp_path, protocols=str(tmp_path / "protocols.yaml"),
            destinations=[
                {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": tps},
                {"name": "test", "ae_title": "TESTTPS", "host": "127.0.0.1", "port": test_tps,
                 "shadow": True}])
        daemon = Daemon(config, 0, tmp_path / "daemon.log").start()  # the port it binds
        try:
            for name, description in (("trial", "trial thorax"), ("clinical", "thorax")):
                write_phantom(tmp_path / name, slices=4, rows=64, columns=64,
                              pixel_spacing=(8.0, 8.0), series_description=description,
                              patient_id=name.upper())
                assert storescu(tmp_path / name, daemon.port).returncode == 0
            wait_until(
                lambda: len([j for j in daemon.status() if j["state"] == JobState.SENT]) == 2,
                90, "two jobs sent")
        finally:
            daemon.stop()
    (clinical,) = (tmp_path / "tps").iterdir()
    (trial,) = (tmp_path / "test-tps").iterdir()
    assert pydicom.dcmread(clinical).PatientID == "CLINICAL"
    trial_ds = pydicom.dcmread(trial)
    assert trial_ds.PatientID == "TRIAL"
    assert {r.ROIName for r in trial_ds.StructureSetROISequence} == {"External", "Bones"}
