"""The node's small HTTP server: health for IT, metrics for Prometheus, a QA page for physics.

Routes (GET only):

- ``/healthz``: 200 when every check passes (listener, ledger, worker,
  assembler and its recent polls, deliveries, protocol watcher and the
  protocols file, free disk), 503 otherwise; a JSON body names each check
  and says why a failing one fails.
- ``/metrics``: Prometheus text format (see :mod:`oncoseg_node.ops.metrics`).
- ``/jobs``: recent jobs as one table (see :mod:`oncoseg_node.ops.jobs_page`).
- ``/jobs/<id>``: one job: slice viewer, structures, gate findings, downloads.
- ``/jobs/<id>/view/<plane>/<index>.png?window=W&show=i,j``: one viewer slice.
- ``/jobs/<id>/qa.png``: the QA snapshot; ``/jobs/<id>/rtstruct.dcm``: the
  structure set as sent.

Standard library ``http.server``: a handful of local requests per minute need
no framework. Requests run on a small fixed pool of threads with a deadline
per connection (:mod:`oncoseg_node.ops.http_pool`), so slow or idle clients
cannot pile up threads. It binds to ``http.host`` (localhost
by default) because the job page shows patient names. Everything that came
from DICOM or the ledger is HTML-escaped; the page also carries a Content
Security Policy that forbids scripts, so an escaping slip cannot run code.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import structlog

from oncoseg_node.config import HttpConfig
from oncoseg_node.contouring.pipeline import load_ct_series
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import Job, Ledger
from oncoseg_node.ops.http_pool import PooledHTTPServer
from oncoseg_node.ops.jobs_page import JobView, render_job_page, render_jobs_page
from oncoseg_node.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from oncoseg_node.ops.qa import qa_relpath
from oncoseg_node.ops.status import series_header
from oncoseg_node.ops.viewer import JobViewer, ViewerCache
from oncoseg_node.ops.viewer_script import JOB_PAGE_CSP
from oncoseg_node.rtstruct.reader import rasterize_crops, read_structure_set

log = structlog.get_logger("oncoseg_node.ops.http")

QA_ROUTE = re.compile(r"^/jobs/(\d{1,18})/qa\.png$")
JOB_ROUTE = re.compile(r"^/jobs/(\d{1,18})/?$")
RTSTRUCT_ROUTE = re.compile(r"^/jobs/(\d{1,18})/rtstruct\.dcm$")
VIEW_ROUTE = re.compile(r"^/jobs/(\d{1,18})/view/(axial|coronal|sagittal)/(\d{1,5})\.png$")
DEFAULT_JOBS = 50
MAX_JOBS = 500
PAGE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"


class StatusSite:
    """What the routes read: the ledger, the spool, the state directory and the service."""

    def __init__(self, *, ledger: Ledger, spool: Spool, state_dir: Path,
                 health: Callable[[], dict[str, bool]], metrics: Callable[[], str],
                 title: str = "oncoseg-node",
                 health_detail: Callable[[], dict[str, str]] | None = None) -> None:
        self.ledger = ledger
        self.spool = spool
        self.state_dir = Path(state_dir)
        self.health = health
        self.health_detail = health_detail
        self.metrics = metrics
        self.title = title
        self.viewers = ViewerCache(self._load_viewer)

    def healthz(self) -> tuple[int, dict[str, Any]]:
        try:
            checks = self.health()
        except Exception as exc:  # a check that raises is a failed check, not a 500
            checks = {"health_check": False}
            log.warning("health_check_failed", error=f"{type(exc).__name__}: {exc}")
        healthy = bool(checks) and all(checks.values())
        body: dict[str, Any] = {"status": "ok" if healthy else "unhealthy", "checks": checks}
        if not healthy and self.health_detail is not None:
            try:
                body["detail"] = self.health_detail()
            except Exception as exc:  # the status code already says unhealthy
                log.warning("health_detail_failed", error=f"{type(exc).__name__}: {exc}")
        return (HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE), body

    def snapshot_path(self, job: Job) -> Path:
        return self.state_dir / qa_relpath(job.id, job.version)

    def qa_png(self, job_id: int) -> bytes | None:
        job = self.ledger.job(job_id)
        if job is None:
            return None
        try:
            return self.snapshot_path(job).read_bytes()
        except FileNotFoundError:
            return None

    def _rtstruct_path(self, job: Job) -> Path | None:
        # the relpath was made by the worker from the job's integers, never from DICOM
        return self.state_dir / job.rtstruct_relpath if job.rtstruct_relpath else None

    def rtstruct(self, job_id: int) -> tuple[bytes, str] | None:
        """The job's structure set file and its download name, or None."""
        job = self.ledger.job(job_id)
        path = self._rtstruct_path(job) if job else None
        if job is None or path is None or not path.is_file():
            return None
        uid = re.sub(r"[^0-9.]", "", str(job.rtstruct_uid or job.id))
        return path.read_bytes(), f"RS.{uid}.dcm"

    def _load_viewer(self, job_id: int) -> JobViewer | None:
        """The job's CT from the spool and its structure set from the outbox, rasterised."""
        job = self.ledger.job(job_id)
        path = self._rtstruct_path(job) if job else None
        if job is None or path is None or not path.is_file():
            return None
        paths = [self.spool.path(p) for p in self.ledger.series_instances(job.series_uid)]
        if not paths or not all(p.is_file() for p in paths):
            return None  # purged by retention
        # the gate already ruled on this series; here it is only displayed
        volume, _ = load_ct_series(paths, override_geometry=True)
        ds = read_structure_set(path)
        masks = rasterize_crops(ds, volume)
        colors = {int(r.ReferencedROINumber): tuple(int(c) for c in r.ROIDisplayColor)
                  for r in ds.ROIContourSequence if "ROIDisplayColor" in r}
        numbers = {str(item.ROIName): int(item.ROINumber) for item in ds.StructureSetROISequence}
        structures = [(name, colors.get(numbers.get(name, -1), (255, 255, 255)), mask)
                      for name, mask in masks.items()]
        return JobViewer(volume, structures)  # type: ignore[arg-type]

    def view_png(self, job_id: int, plane: str, index: int, query: str) -> bytes | None:
        """One viewer slice; ValueError for a bad window, structure list or index."""
        viewer = self.viewers.get(job_id)
        if viewer is None:
            return None
        params = parse_qs(query)
        window = (params.get("window") or ["soft"])[0]
        show = (params.get("show") or [""])[0]
        visible = None
        if show == "none":
            visible = []
        elif show:
            visible = [int(v) for v in show.split(",") if v.isdigit()]
        return viewer.png(plane, index, window, visible)

    def _patient(self, series_uid: str) -> dict[str, str]:
        return series_header(self.ledger, self.spool, series_uid)

    def _view(self, job: Job) -> JobView:
        return JobView(job=job, deliveries=self.ledger.deliveries(job_id=job.id),
                       patient=self._patient(job.series_uid),
                       has_snapshot=self.snapshot_path(job).is_file())

    def job_views(self, limit: int) -> list[JobView]:
        return [self._view(job) for job in self.ledger.jobs(limit=limit)]

    def jobs_page(self, limit: int = DEFAULT_JOBS) -> str:
        return render_jobs_page(self.job_views(limit), title=self.title)

    def job_page(self, job_id: int) -> str | None:
        job = self.ledger.job(job_id)
        if job is None:
            return None
        try:
            viewer = self.viewers.get(job_id)
        except Exception:  # the page still shows the job when its files cannot be read
            log.exception("viewer_load_failed", job_id=job_id)
            viewer = None
        return render_job_page(self._view(job), viewer, title=self.title)


# -- the server ---------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
        site = self.server.site
        url = urlsplit(self.path)
        try:
            if url.path == "/healthz":
                code, body = site.healthz()
                self._send(code, "application/json", json.dumps(body).encode())
            elif url.path == "/metrics":
                self._send(HTTPStatus.OK, METRICS_CONTENT_TYPE, site.metrics().encode())
            elif url.path in ("/jobs", "/jobs/"):
                self._send(HTTPStatus.OK, "text/html; charset=utf-8",
                           site.jobs_page(_limit(url.query)).encode(),
                           {"Content-Security-Policy": PAGE_CSP})
            elif match := JOB_ROUTE.match(url.path):
                page = site.job_page(int(match.group(1)))
                if page is None:
                    self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no such job\n")
                else:
                    self._send(HTTPStatus.OK, "text/html; charset=utf-8", page.encode(),
                               {"Content-Security-Policy": JOB_PAGE_CSP})
            elif match := QA_ROUTE.match(url.path):
                png = site.qa_png(int(match.group(1)))
                if png is None:
                    self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no snapshot for this job\n")
                else:
                    self._send(HTTPStatus.OK, "image/png", png)
            elif match := RTSTRUCT_ROUTE.match(url.path):
                found = site.rtstruct(int(match.group(1)))
                if found is None:
                    self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no structure set\n")
                else:
                    self._send(HTTPStatus.OK, "application/dicom", found[0],
                               {"Content-Disposition": f'attachment; filename="{found[1]}"'})
            elif match := VIEW_ROUTE.match(url.path):
                job_id, plane, index = int(match.group(1)), match.group(2), int(match.group(3))
                try:
                    png = site.view_png(job_id, plane, index, url.query)
                except ValueError as exc:
                    self._send(HTTPStatus.BAD_REQUEST, "text/plain", f"{exc}\n".encode())
                    return
                if png is None:
                    self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no slices for this job\n")
                else:
                    self._send(HTTPStatus.OK, "image/png", png)
            elif url.path == "/":
                self._send(HTTPStatus.FOUND, "text/plain", b"see /jobs\n", {"Location": "/jobs"})
            else:
                self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found\n")
        except Exception:  # one bad request must not take the server thread down
            log.exception("http_request_failed", path=url.path)
            self._send(HTTPStatus.INTERNAL_SERVER_ERROR, "text/plain", b"internal error\n")

    def _send(self, code: int, content_type: str, body: bytes,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def handle_one_request(self) -> None:
        super().handle_one_request()
        # A keep-alive connection gets a fresh deadline for its next request.
        self.server.extend_deadline(self.connection)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        log.debug("http_request", client=self.client_address[0], request=format % args)


def _limit(query: str) -> int:
    values = parse_qs(query).get("limit") or []
    try:
        return max(1, min(int(values[0]), MAX_JOBS)) if values else DEFAULT_JOBS
    except ValueError:
        return DEFAULT_JOBS


class _Server(PooledHTTPServer):
    site: StatusSite


class HttpServer:
    """Owns the listening socket and its thread; ``port`` is the bound port (for port 0)."""

    def __init__(self, config: HttpConfig, site: StatusSite) -> None:
        self.config = config
        self.site = site
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    def start(self) -> None:
        server_class = type("_BoundServer", (_Server,), {
            "address_family": socket.AF_INET6 if ":" in self.config.host else socket.AF_INET})
        server = server_class((self.config.host, self.config.port), _Handler,
                              threads=self.config.threads, timeout_s=self.config.timeout_s)
        server.site = self.site
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="http", daemon=True,
                                        kwargs={"poll_interval": 0.2})
        self._thread.start()
        log.info("http_listening", host=self.config.host, port=self.port)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
