"""The HTTP server of the real daemon after a real series went through it.

DCMTK storescu sends a phantom CT, storescp plays the planning system; then
``/healthz``, ``/metrics``, ``/jobs`` and the QA image are read as IT,
Prometheus and a physicist (headless Chromium) would.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket

import numpy as np
import pytest

from oncoseg_node.commissioning.phantom import write_phantom
from oncoseg_node.contouring.protocols import load_protocols
from oncoseg_node.dicom import status
from oncoseg_node.ledger import JobState
from tests.conftest import write_config
from tests.ctfactory import series
from tests.daemon import Daemon, wait_until
from tests.peers import storescp, storescu
from tests.pngread import decode
from tests.test_http_page import screenshot
from tests.test_metrics import parse
from tests.test_receiver import scu_store

pytestmark = pytest.mark.peers

SLICES = 48
# A thorax protocol as physics would write it; Heart is not something the
# classical engine contours, so the page must show it as not found.
PROTOCOLS = """
structures:
  External: {color: [0, 255, 0], type: EXTERNAL, engine: classical}
  Lung_L: {color: [0, 160, 255], type: ORGAN, engine: classical, laterality: left}
  Lung_R: {color: [255, 160, 0], type: ORGAN, engine: classical, laterality: right}
  SpinalCanal: {color: [255, 255, 0], type: ORGAN, engine: classical}
  Bones: {color: [255, 0, 255], type: ORGAN, engine: classical}
  Heart: {color: [255, 0, 0], type: ORGAN, engine: classical}
protocols:
  - name: thorax
    priority: 0
    structures: [External, Lung_L, Lung_R, SpinalCanal, Bones, Heart]
fallback: thorax
"""


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def sample(families: dict, name: str, **labels: str) -> float:
    family = families.get(name) or families[re.sub(r"_(bucket|sum|count)$", "", name)]
    values = [v for n, lab, v in family["samples"] if n == name and lab == labels]
    assert len(values) == 1, (name, labels, family["samples"])
    return values[0]


@pytest.fixture(scope="module")
def contoured_node(tmp_path_factory):
    """A daemon that has contoured and delivered one phantom series; yields what it served."""
    tmp = tmp_path_factory.mktemp("http_daemon")
    phantom_dir = tmp / "phantom"
    phantom_dir.mkdir()
    # 256 pixels of 1.95 mm: the whole 50 cm field of view in a quarter of the data
    write_phantom(phantom_dir, slices=SLICES, rows=256, columns=256,
                  pixel_spacing=(1.953125, 1.953125))
    protocols = tmp / "protocols.yaml"
    protocols.write_text(PROTOCOLS)
    with storescp(tmp / "tps") as tps_port:
        config = write_config(
            tmp, protocols=str(protocols),
            destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1",
                           "port": tps_port, "retry": {"first_delay_s": 1, "max_delay_s": 5}}])
        daemon = Daemon(config, 0, tmp / "daemon.log").start()
        port, http_port = daemon.port, daemon.http_port
        try:
            assert storescu(phantom_dir, port).returncode == 0
            short = series(1)[0]
            short.PixelData = short.PixelData[:100]  # refused: 0xA904
            assert scu_store(port, [short]) == [status.PIXEL_DATA_LENGTH_WRONG]
            (job,) = wait_until(lambda: [j for j in daemon.status() if j["state"] == JobState.SENT],
                                180, f"the job sent\n{daemon.log()}")
            # the QA picture is drawn after the deliveries start, so it may follow the send
            wait_until(lambda: get(http_port, f"/jobs/{job['job']}/qa.png")[0] == 200, 60,
                       f"the QA picture\n{daemon.log()}")
            served = {path: get(http_port, path) for path in
                      ("/healthz", "/metrics", "/jobs", f"/jobs/{job['job']}",
                       f"/jobs/{job['job']}/qa.png")}
            image = screenshot(f"http://127.0.0.1:{http_port}/jobs/{job['job']}", tmp)
            shutil.copy(tmp / "screenshot.png", tmp / "jobs-page.png")
        finally:
            assert daemon.stop() == 0, daemon.log()
    yield {"job": job, "served": served, "screenshot": image, "http_port": http_port,
           "library": load_protocols(protocols).library}


def structure_colors(node: dict) -> dict[str, tuple[int, int, int]]:
    """Colours of the structures the job found (all but Heart)."""
    colors = {row["name"]: node["library"][row["name"]].color
              for row in node["job"]["structures"] if not row["absent"]}
    assert set(colors) == {"External", "Lung_L", "Lung_R", "SpinalCanal", "Bones"}
    return colors


def test_healthz_reports_every_part_alive(contoured_node):
    status, body = contoured_node["served"]["/healthz"]
    assert status == 200
    checks = json.loads(body)["checks"]
    assert checks and all(checks.values())
    assert {"listener", "ledger", "worker"} <= set(checks)


def test_metrics_count_what_happened(contoured_node):
    status, body = contoured_node["served"]["/metrics"]
    assert status == 200
    families = parse(body.decode())
    assert sample(families, "oncoseg_instances_received_total") == SLICES
    assert sample(families, "oncoseg_jobs", state=JobState.SENT) == 1
    assert sample(families, "oncoseg_jobs", state=JobState.QUEUED) == 0
    assert sample(families, "oncoseg_queue_depth") == 0
    assert sample(families, "oncoseg_segmentation_seconds_count") == 1
    assert sample(families, "oncoseg_delivery_latency_seconds_count", destination="tps") == 1
    assert sample(families, "oncoseg_deliveries_pending", destination="tps") == 0
    assert sample(families, "oncoseg_disk_free_bytes") > 0
    assert sample(families, "oncoseg_health", check="worker") == 1
    assert sample(families, "oncoseg_instances_refused_total", status="0xA904") == 1
    assert sample(families, "oncoseg_jobs_held") == 0
    assert families["oncoseg_deliveries_failed_total"]["type"] == "counter"
    assert not families["oncoseg_deliveries_failed_total"]["samples"]  # nothing failed yet


def test_jobs_page_lists_the_job_with_its_snapshot(contoured_node):
    job = contoured_node["job"]
    status, body = contoured_node["served"]["/jobs"]
    page = body.decode()
    assert status == 200
    assert job["series_uid"] in page and f'<a href="/jobs/{job["job"]}">' in page
    status, body = contoured_node["served"][f"/jobs/{job['job']}"]
    page = body.decode()
    assert status == 200 and f'src="/jobs/{job["job"]}/qa.png"' in page
    for name in structure_colors(contoured_node):
        assert f"<td>{name}</td>" in page
    assert "<td>Heart</td>" in page and "not found" in page


def test_qa_snapshot_outlines_each_structure_in_its_colour(contoured_node):
    status, body = contoured_node["served"][f"/jobs/{contoured_node['job']['job']}/qa.png"]
    assert status == 200
    image = decode(body)
    for name, color in structure_colors(contoured_node).items():
        assert (image == np.array(color, np.uint8)).all(axis=2).sum() > 20, name


def test_browser_shows_the_contours_in_their_colours(contoured_node):
    image = contoured_node["screenshot"]
    colors = structure_colors(contoured_node)
    for name, color in colors.items():
        ys, xs = np.nonzero((image == np.array(color, np.uint8)).all(axis=2))
        assert ys.size > 20, f"{name} ({color}) not visible on the page"
    # The body outline is drawn in three planes side by side: wider than any swatch.
    ys, xs = np.nonzero((image == np.array(colors["External"], np.uint8)).all(axis=2))
    assert xs.max() - xs.min() > 500 and ys.max() - ys.min() > 150


def test_http_port_is_closed_after_stop(contoured_node):
    with pytest.raises(OSError), socket.create_connection(
            ("127.0.0.1", contoured_node["http_port"]), timeout=1):
        pass
