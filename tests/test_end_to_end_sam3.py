"""The daemon end to end with ``engine: sam3`` on a tiny, randomly initialised model.

The weights are random, so this test checks plumbing only: the SAM3 path is
loaded by the daemon from a local directory, runs on every structure the
protocol gives it, and the structure set still reaches the TPS (with the
classical External, and SAM3's structures drawn or reported absent). It says
nothing about segmentation quality.
"""

from __future__ import annotations

import pydicom
import pytest

pytest.importorskip("torch", reason="the sam3 extra is part of the test install")

from oncoseg_node.ledger import JobState  # noqa: E402
from tests.conftest import write_config  # noqa: E402
from tests.daemon import Daemon, wait_until  # noqa: E402
from tests.peers import dciodvfy, storescp, storescu  # noqa: E402
from tests.sam3_tiny import build_tiny_sam3  # noqa: E402

pytestmark = pytest.mark.peers

PROTOCOLS = """
structures:
  External: {color: [0, 255, 0], type: EXTERNAL, engine: classical}
  Heart: {color: [255, 0, 0], type: ORGAN, engine: sam3, concepts: [heart]}
  Lung_L: {color: [0, 128, 255], type: ORGAN, engine: sam3, concepts: [left lung],
           laterality: left}
protocols:
  - name: thorax-sam3
    priority: 1
    structures: [External, Heart, Lung_L]
fallback: thorax-sam3
"""


def test_random_tiny_sam3_plumbing_delivers_a_structure_set(tmp_path):
    from oncoseg_node.commissioning.phantom import write_phantom

    model = build_tiny_sam3(tmp_path / "facebook-sam3-tiny")
    (tmp_path / "protocols.yaml").write_text(PROTOCOLS)
    write_phantom(tmp_path / "ct", slices=12, rows=128, columns=128, pixel_spacing=(3.5, 3.5))
    with storescp(tmp_path / "tps") as tps_port:
        config = write_config(
            tmp_path, protocols=str(tmp_path / "protocols.yaml"),
            engine={"name": "sam3", "sam3": {"model_dir": str(model), "device": "cpu",
                                             "dtype": "float32", "batch_size": 4}},
            destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1",
                           "port": tps_port}],
        )
        daemon = Daemon(config, 0, tmp_path / "daemon.log").start(timeout=180)
        try:
            assert storescu(tmp_path / "ct", daemon.port).returncode == 0
            received = wait_until(lambda: list((tmp_path / "tps").iterdir()), 300,
                                  f"an RTSTRUCT at the TPS\n{daemon.log()}")
            (job,) = wait_until(lambda: [j for j in daemon.status() if j["state"] == JobState.SENT],
                                60, "job sent")
        finally:
            assert daemon.stop() == 0
    ds = pydicom.dcmread(received[0])
    errors, output = dciodvfy(received[0])
    assert errors == [], output
    names = {item.ROIName for item in ds.StructureSetROISequence}
    assert "External" in names
    assert {s["name"] for s in job["structures"]} == {"External", "Heart", "Lung_L"}
    descriptions = {item.ROIName: item.ROIGenerationDescription
                    for item in ds.StructureSetROISequence}
    assert descriptions["External"].startswith("classical: ")
    assert "protocol thorax-sam3@" in descriptions["External"]
    assert "sam3: SAM3 facebook-sam3-tiny sha256:" in ds.StructureSetDescription


def test_preprocessing_mismatch_stops_the_daemon_at_start_naming_the_file(tmp_path):
    """A checkpoint normalised with ImageNet statistics is refused before anything is received."""
    import json
    import subprocess
    import sys

    model = build_tiny_sam3(tmp_path / "sam3-imagenet")
    path = model / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()),
                                "image_std": [0.229, 0.224, 0.225]}))
    (tmp_path / "protocols.yaml").write_text(PROTOCOLS)
    config = write_config(
        tmp_path, protocols=str(tmp_path / "protocols.yaml"),
        engine={"name": "sam3", "sam3": {"model_dir": str(model), "device": "cpu",
                                         "dtype": "float32"}})
    proc = subprocess.run([sys.executable, "-m", "oncoseg_node.cli", "run", "--config",
                           str(config)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert f"{path}: image_std [0.229, 0.224, 0.225]" in output, output
