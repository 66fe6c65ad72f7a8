"""The /jobs page as a browser shows it: headless Chromium screenshot, checked pixel by pixel."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset

from oncoseg_node.config import HttpConfig
from oncoseg_node.contouring.volume import Volume
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import Ledger
from oncoseg_node.ops.http import HttpServer, StatusSite
from oncoseg_node.ops.metrics import NodeMetrics
from oncoseg_node.ops.qa import Overlay, qa_relpath, write_qa_snapshot
from tests.peers import require
from tests.pngread import decode

pytestmark = pytest.mark.peers

STRUCTURES = {  # name: colour, as a physicist's protocol would give them
    "External": (0, 255, 0),
    "Lung_L": (0, 160, 255),
    "Lung_R": (255, 160, 0),
    "Heart": (255, 0, 0),
    "SpinalCord": (255, 255, 0),
}
WINDOW = (1280, 1800)


def screenshot(url: str, tmp_path: Path) -> np.ndarray:
    """Load ``url`` in headless Chromium and return the screenshot's RGB pixels."""
    out = tmp_path / "screenshot.png"
    proc = subprocess.run(
        [require("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'chromium-profile'}",
         f"--screenshot={out}", f"--window-size={WINDOW[0]},{WINDOW[1]}", url],
        capture_output=True, text=True, timeout=120)
    assert out.is_file(), f"chromium wrote no screenshot:\n{proc.stderr[-2000:]}"
    return decode(out.read_bytes())


def thorax() -> tuple[Volume, dict[str, np.ndarray]]:
    """A supine thorax of ellipsoids (HFS, 1.5 mm pixels, 3 mm slices) and its masks."""
    shape = (60, 160, 200)
    z, y, x = np.indices(shape, dtype=np.float32)
    z, y, x = z * 3.0, y * 1.5, x * 1.5  # mm from the first voxel

    def ellipsoid(cz, cy, cx, rz, ry, rx):
        return ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1

    body = (((y - 120) / 95) ** 2 + ((x - 150) / 135) ** 2 <= 1) & (z >= 0)
    lung_r = ellipsoid(95, 115, 95, 70, 55, 40)  # patient's right: smaller x (LPS)
    lung_l = ellipsoid(95, 115, 205, 70, 55, 40)
    heart = ellipsoid(70, 95, 165, 35, 35, 40) & ~lung_l & ~lung_r
    vertebra = ellipsoid(90, 185, 150, 200, 14, 14)
    cord = ellipsoid(90, 185, 150, 200, 5, 5)
    hu = np.full(shape, -1000.0, np.float32)
    hu[body] = 20.0
    hu[lung_l | lung_r] = -820.0
    hu[heart] = 45.0
    hu[vertebra & ~cord] = 600.0
    volume = Volume(
        hu=hu, positions=np.array([[-150.0, -120.0, -90.0 + 3.0 * k] for k in range(shape[0])]),
        row_direction=np.array([1.0, 0, 0]), col_direction=np.array([0, 1.0, 0]),
        pixel_spacing=(1.5, 1.5), sop_instance_uids=tuple(str(k) for k in range(shape[0])),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1",
        series_instance_uid="1", frame_of_reference_uid="1", patient_position="HFS",
        header=Dataset())
    return volume, {"External": body, "Lung_L": lung_l, "Lung_R": lung_r, "Heart": heart,
                    "SpinalCord": cord}


@pytest.fixture
def served_job(tmp_path):
    state = tmp_path / "state"
    ledger = Ledger(state / "ledger.sqlite3")
    ledger.record_instance(sop_instance_uid="1.2.3.1", series_uid="1.2.3", study_uid="1.2",
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.2", relpath="objects/x.dcm",
                           sha256="0" * 64, size=1, calling_ae="CTSIM")
    job_id = ledger.close_series("1.2.3")
    job = ledger.claim(3)
    volume, masks = thorax()
    results = [{"name": name, "absent": False, "score": None,
                "volume_cc": round(volume.mask_volume_cc(masks[name]), 1),
                "flags": ["centre lies on the patient's right (-55.0 mm from midline)"]
                if name == "Lung_L" else [], "note": "", "color": list(color)}
               for name, color in STRUCTURES.items()]
    ledger.update_job(job_id, protocol="thorax", protocol_version="0123abcd", results=results)
    ledger.start_deliveries(job_id, [("tps", "1.2.3.9", "outbox/x.dcm")])
    write_qa_snapshot(state / qa_relpath(job.id, job.version), volume,
                      [Overlay(n, masks[n], c, external=n == "External")
                       for n, c in STRUCTURES.items()], panel_px=360)
    site = StatusSite(ledger=ledger, spool=Spool(state / "spool"), state_dir=state,
                      health=lambda: {"ok": True}, metrics=NodeMetrics().render)
    server = HttpServer(HttpConfig(host="127.0.0.1", port=0), site)
    server.start()
    yield server.port
    server.stop()
    ledger.close()


def test_jobs_page_shows_the_contours_in_their_colours(served_job, tmp_path):
    image = screenshot(f"http://127.0.0.1:{served_job}/jobs/1", tmp_path)
    assert image.shape == (WINDOW[1], WINDOW[0], 3)
    boxes = {}
    for name, color in STRUCTURES.items():
        ys, xs = np.nonzero((image == np.array(color, np.uint8)).all(axis=2))
        assert ys.size, f"{name}'s colour {color} is not on the page"
        boxes[name] = (ys.min(), ys.max(), xs.min(), xs.max(), ys.size)
    # The External outline is drawn in all three planes: its colour spans most of
    # the image's width, far beyond a 12-pixel table swatch.
    top, bottom, left, right, count = boxes["External"]
    assert right - left > 900 and bottom - top > 150 and count > 2000
    # Patient's left lung on the image's right in the axial plane (left third of the image).
    axial = slice(left, left + 370)
    for lung, side in (("Lung_L", 1), ("Lung_R", -1)):
        mask = (image[:, axial] == np.array(STRUCTURES[lung], np.uint8)).all(axis=2)
        cols = np.nonzero(mask[top:bottom])[1]
        assert cols.size > 100
        centre = (cols.mean() - 185) * side
        assert centre > 30, f"{lung} drawn on the wrong side"
