"""The HTTP server on loopback: health codes, metrics, the jobs page (escaped) and QA images."""

from __future__ import annotations

import http.client
import json
import socket

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
from oncoseg_node.ops.worker import WorkerMetrics
from tests.ctfactory import ct_slice, encode
from tests.pngread import decode

pytestmark = pytest.mark.peers

HOSTILE = '<script>alert("x")</script>'


def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def tiny_volume() -> tuple[Volume, list[Overlay]]:
    hu = np.full((6, 24, 24), -1000.0, np.float32)
    body = np.zeros(hu.shape, bool)
    body[:, 4:20, 4:20] = True
    hu[body] = 0
    volume = Volume(hu=hu, positions=np.array([[0.0, 0.0, 3.0 * k] for k in range(6)]),
                    row_direction=np.array([1.0, 0, 0]), col_direction=np.array([0, 1.0, 0]),
                    pixel_spacing=(2.0, 2.0), sop_instance_uids=("1",) * 6,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1",
                    series_instance_uid="1", frame_of_reference_uid="1",
                    patient_position="HFS", header=Dataset())
    return volume, [Overlay("External", body, (0, 255, 0), external=True)]


class Node:
    """A ledger and spool with one contoured job, served by a real HttpServer."""

    def __init__(self, tmp_path) -> None:
        self.state_dir = tmp_path / "state"
        self.ledger = Ledger(self.state_dir / "ledger.sqlite3")
        self.spool = Spool(self.state_dir / "spool")
        self.checks = {"listener": True, "ledger": True, "worker": True}
        self.metrics = NodeMetrics()
        site = StatusSite(ledger=self.ledger, spool=self.spool, state_dir=self.state_dir,
                          health=lambda: dict(self.checks), metrics=self.metrics.render)
        self.server = HttpServer(HttpConfig(host="127.0.0.1", port=0), site)

    def add_job(self, *, patient_name: str = "Doe^Jane", structure: str = "External",
                flags: tuple[str, ...] = (), snapshot: bool = True) -> int:
        ds = ct_slice(series_uid="1.2.826.0.1.3680043.2.1125.1", study_uid="1.2.3",
                      frame_uid="1.2.4", index=0)
        ds.PatientName = patient_name
        ds.SeriesDescription = "Thorax " + HOSTILE
        stored = self.spool.store(encode(ds))
        self.ledger.record_instance(
            sop_instance_uid=str(ds.SOPInstanceUID), series_uid=str(ds.SeriesInstanceUID),
            study_uid="1.2.3", sop_class_uid=str(ds.SOPClassUID), relpath=stored.relpath,
            sha256=stored.sha256, size=stored.size, calling_ae='CT"SIM<')
        job_id = self.ledger.close_series(str(ds.SeriesInstanceUID))
        job = self.ledger.claim(3)
        self.ledger.update_job(job_id, protocol="default", protocol_version="abc", results=[
            {"name": structure, "absent": False, "score": 0.91, "volume_cc": 1234.5,
             "flags": list(flags), "note": "", "color": [0, 255, 0]},
            {"name": "Heart", "absent": True, "score": None, "volume_cc": None, "flags": [],
             "note": "not supported by the classical engine", "color": [255, 0, 0]},
        ])
        self.ledger.start_deliveries(job_id, [("tps", "1.2.3.9", "outbox/x.dcm")])
        if snapshot:
            volume, overlays = tiny_volume()
            write_qa_snapshot(self.state_dir / qa_relpath(job.id, job.version), volume,
                              overlays, panel_px=60)
        return job_id


@pytest.fixture
def node(tmp_path):
    node = Node(tmp_path)
    node.server.start()
    yield node
    node.server.stop()
    node.ledger.close()


def test_binds_the_configured_host_and_reports_the_ephemeral_port(node):
    assert node.server.port > 0
    assert node.server._server.server_address[0] == "127.0.0.1"
    status, _, _ = get(node.server.port, "/healthz")
    assert status == 200


def test_healthz_is_200_only_when_every_check_passes(node):
    status, headers, body = get(node.server.port, "/healthz")
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"status": "ok", "checks": node.checks}
    node.checks["worker"] = False
    status, _, body = get(node.server.port, "/healthz")
    assert status == 503
    assert json.loads(body)["checks"]["worker"] is False
    assert json.loads(body)["status"] == "unhealthy"


def test_healthz_is_503_when_a_check_raises(node):
    def broken() -> dict[str, bool]:
        raise RuntimeError("ledger file gone")

    node.server.site.health = broken
    status, _, body = get(node.server.port, "/healthz")
    assert status == 503 and json.loads(body)["status"] == "unhealthy"


def test_metrics_are_served_as_prometheus_text(node):
    worker = WorkerMetrics()
    node.metrics.add(worker.collectors())
    worker.segmentation_seconds.observe(2.0)
    status, headers, body = get(node.server.port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "oncoseg_segmentation_seconds_count 1.0\n" in body.decode()


def test_jobs_page_escapes_everything_from_dicom_and_the_ledger(node):
    job_id = node.add_job(patient_name=f"Evil^{HOSTILE}", structure=f"Lung{HOSTILE}",
                          flags=(f"volume {HOSTILE}",))
    status, headers, body = get(node.server.port, "/jobs")
    listing = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none'
    assert "<script" not in listing.lower()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in listing
    status, headers, body = get(node.server.port, f"/jobs/{job_id}")
    page = body.decode()
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert "<script" not in page.lower()  # no structure set yet: no viewer, no script
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "CT&quot;SIM&lt;" in page  # the calling AE title
    assert f'src="/jobs/{job_id}/qa.png"' in page
    assert "background: rgb(0, 255, 0)" in page  # the structure's swatch
    assert "not supported by the classical engine" in page
    assert 'class="flagged"' in page


def test_jobs_page_names_the_patient_and_shows_the_flags(node):
    job_id = node.add_job(flags=("volume 12.0 cc outside expected 40-200 cc",))
    listing = get(node.server.port, "/jobs")[2].decode()
    assert "Doe, Jane" in listing and "tps: pending, 0 attempts so far" in listing
    page = get(node.server.port, f"/jobs/{job_id}")[2].decode()
    assert "Doe, Jane" in page
    assert "volume 12.0 cc outside expected 40-200 cc" in page
    assert "1234.5" in page and "0.91" in page
    assert "tps: pending, 0 attempts so far" in page


def test_qa_png_is_served_and_missing_ones_are_404(node):
    job_id = node.add_job()
    status, headers, body = get(node.server.port, f"/jobs/{job_id}/qa.png")
    assert status == 200 and headers["Content-Type"] == "image/png"
    image = decode(body)
    assert (image == [0, 255, 0]).all(axis=2).any()
    other = node.add_job(snapshot=False)
    assert get(node.server.port, f"/jobs/{other}/qa.png")[0] == 404
    assert f'src="/jobs/{job_id}/qa.png"' in get(node.server.port, f"/jobs/{job_id}")[2].decode()
    assert f'src="/jobs/{other}/qa.png"' not in get(node.server.port, f"/jobs/{other}")[2].decode()
    assert get(node.server.port, "/jobs/999/qa.png")[0] == 404


@pytest.mark.parametrize("path", [
    "/jobs/1/../../ledger.sqlite3", "/jobs/%2e%2e/qa.png", "/jobs/1/qa.png/../../../spool",
    "/etc/passwd", "/jobs/-1/qa.png",
])
def test_no_path_reaches_the_state_directory(node, path):
    node.add_job()
    status, _, body = get(node.server.port, path)
    assert status == 404 and b"SQLite" not in body


def test_stop_closes_the_port(tmp_path):
    node = Node(tmp_path)
    node.server.start()
    port = node.server.port
    node.server.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    node.ledger.close()
