"""The node's small HTTP server: health for IT, metrics for Prometheus, a QA page for physics.

Routes (GET only):

- ``/healthz``: 200 when every check passes (listener, ledger, worker,
  assembler and its recent polls, deliveries, protocol watcher and the
  protocols file, free disk), 503 otherwise; a JSON body names each check
  and says why a failing one fails.
- ``/metrics``: Prometheus text format (see :mod:`oncoseg_node.ops.metrics`).
- ``/jobs``: recent jobs, each with its QA snapshot (contours over three
  planes) and every structure's volume, score and sanity flags.
- ``/jobs/<id>/qa.png``: the snapshot itself.

Standard library ``http.server`` in its own thread: a handful of local
requests per minute need no framework. It binds to ``http.host`` (localhost
by default) because the job page shows patient names. Everything that came
from DICOM or the ledger is HTML-escaped; the page also carries a Content
Security Policy that forbids scripts, so an escaping slip cannot run code.
"""

from __future__ import annotations

import html
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pydicom
import structlog

from oncoseg_node.config import HttpConfig
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import Delivery, Job, Ledger
from oncoseg_node.ops.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from oncoseg_node.ops.qa import qa_relpath

log = structlog.get_logger("oncoseg_node.ops.http")

QA_ROUTE = re.compile(r"^/jobs/(\d{1,18})/qa\.png$")
DEFAULT_JOBS = 50
MAX_JOBS = 500
PAGE_CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"
# What the page shows about the patient, read from the series' first stored instance.
PATIENT_TAGS = ["PatientName", "PatientID", "StudyDate", "SeriesDescription", "Modality"]


@dataclass(frozen=True)
class JobView:
    """One job as the page shows it."""

    job: Job
    deliveries: Sequence[Delivery] = ()
    patient: dict[str, str] = field(default_factory=dict)
    has_snapshot: bool = False


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

    def _patient(self, series_uid: str) -> dict[str, str]:
        relpaths = self.ledger.series_instances(series_uid)
        if not relpaths:
            return {}  # purged by retention, or never stored
        try:
            ds = pydicom.dcmread(self.spool.path(relpaths[0]), stop_before_pixels=True,
                                 specific_tags=PATIENT_TAGS)
        except Exception:  # a page must render even if one file is unreadable
            return {}
        return {tag: str(ds.get(tag, "") or "") for tag in PATIENT_TAGS}

    def job_views(self, limit: int) -> list[JobView]:
        views = []
        for job in self.ledger.jobs(limit=limit):
            views.append(JobView(job=job, deliveries=self.ledger.deliveries(job_id=job.id),
                                 patient=self._patient(job.series_uid),
                                 has_snapshot=self.snapshot_path(job).is_file()))
        return views

    def jobs_page(self, limit: int = DEFAULT_JOBS) -> str:
        return render_jobs_page(self.job_views(limit), title=self.title)


# -- the page -----------------------------------------------------------------

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #1b1b1b; background: #f4f4f2; }
h1 { font-size: 20px; margin: 0 0 4px; }
.note { color: #6b3b00; margin: 0 0 16px; }
section.job { background: #fff; border: 1px solid #ccc; border-radius: 6px; padding: 12px;
  margin: 0 0 16px; }
section.job h2 { font-size: 16px; margin: 0 0 6px; }
.state { display: inline-block; padding: 1px 8px; border-radius: 9px; font-size: 12px;
  background: #ddd; margin-left: 6px; vertical-align: 1px; }
.state-sent { background: #cfe9cf; } .state-delivering, .state-running, .state-queued {
  background: #d7e3f4; }
.state-held, .state-failed, .state-quarantined { background: #f6d3c9; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; margin: 0 0 8px; }
dt { color: #555; } dd { margin: 0; word-break: break-all; }
img.qa { display: block; margin: 8px 0; max-width: 100%; height: auto;
  image-rendering: pixelated; }
table { border-collapse: collapse; }
th, td { text-align: left; padding: 3px 10px 3px 0; border-bottom: 1px solid #eee; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flagged td { background: #fff1cc; }
.swatch { display: inline-block; width: 12px; height: 12px; border: 1px solid #555;
  vertical-align: -1px; }
.flag { color: #8a3b00; } .absent { color: #777; font-style: italic; }
ul.deliveries { margin: 6px 0 0; padding-left: 18px; }
"""


def _e(value: Any) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


def _color_css(color: Any) -> str | None:
    """``rgb(r, g, b)`` for a stored colour, or None unless it is three ints in 0..255."""
    if (isinstance(color, (list, tuple)) and len(color) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255
                    for c in color)):
        return f"rgb({color[0]}, {color[1]}, {color[2]})"
    return None


def _state_class(state: str) -> str:
    return "state state-" + re.sub(r"[^a-z]", "", state.lower())


def _structure_rows(results: Sequence[dict[str, Any]]) -> str:
    rows = []
    for row in results:
        css = _color_css(row.get("color"))
        swatch = f'<span class="swatch" style="background: {css}"></span>' if css else ""
        flags = [str(f) for f in row.get("flags") or []]
        if row.get("absent"):
            volume = '<span class="absent">not found</span>'
        elif isinstance(row.get("volume_cc"), (int, float)):
            volume = f"{row['volume_cc']:.1f}"
        else:
            volume = "-"
        score = f"{row['score']:.2f}" if isinstance(row.get("score"), (int, float)) else "-"
        notes = [f'<span class="flag">{_e(f)}</span>' for f in flags]
        if row.get("note"):
            notes.append(f'<span class="absent">{_e(row["note"])}</span>')
        rows.append(
            f'<tr class="{"flagged" if flags else ""}"><td>{swatch}</td>'
            f'<td>{_e(row.get("name"))}</td><td class="num">{volume}</td>'
            f'<td class="num">{score}</td><td>{"<br>".join(notes) or "-"}</td></tr>')
    return ("<table><tr><th></th><th>Structure</th><th>Volume (cc)</th><th>Score</th>"
            "<th>Sanity flags</th></tr>" + "".join(rows) + "</table>")


def _job_section(view: JobView) -> str:
    job, patient = view.job, view.patient
    name = patient.get("PatientName", "").replace("^", ", ", 1).replace("^", " ")
    facts = [
        ("Patient", f"{name} ({patient['PatientID']})" if patient.get("PatientID") else name),
        ("Series", patient.get("SeriesDescription")),
        ("Study date", patient.get("StudyDate")),
        ("Series UID", job.series_uid),
        ("Calling AE", job.calling_ae),
        ("Protocol", f"{job.protocol} ({job.protocol_version})" if job.protocol else None),
        ("Series complete", _when(job.created_at)),
        ("Finished", _when(job.finished_at)),
        ("Attempts", job.attempts),
        ("Reason", job.reason),
    ]
    dl = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts if v not in (None, ""))
    parts = [
        f'<section class="job" id="job-{job.id}">',
        f'<h2>Job {job.id} &middot; version {job.version}'
        f'<span class="{_state_class(job.state)}">{_e(job.state)}</span></h2>',
        f"<dl>{dl}</dl>",
    ]
    if view.has_snapshot:
        parts.append(f'<img class="qa" src="/jobs/{job.id}/qa.png" alt="QA snapshot of job '
                     f'{job.id}: axial, coronal and sagittal planes with the contours">')
    if job.results:
        parts.append(_structure_rows(job.results))
    if view.deliveries:
        items = []
        for d in view.deliveries:
            extra = f" &mdash; {_e(d.reason)}" if d.reason else ""
            items.append(f"<li>{_e(d.destination)}: {_e(d.state)} after {d.attempts} "
                         f"attempt(s){extra}</li>")
        parts.append(f'<ul class="deliveries">{"".join(items)}</ul>')
    parts.append("</section>")
    return "\n".join(parts)


def render_jobs_page(views: Sequence[JobView], *, title: str = "oncoseg-node") -> str:
    """The ``/jobs`` page; every value that came from DICOM or the ledger is escaped."""
    body = "\n".join(_job_section(v) for v in views) or "<p>No jobs yet.</p>"
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="refresh" content="30">'
        f"<title>{_e(title)}: recent jobs</title><style>{STYLE}</style></head><body>"
        f"<h1>{_e(title)}: recent jobs</h1>"
        '<p class="note">Automatic drafts: every contour must be reviewed and approved in the '
        f"planning system. Page generated {_e(_when(time.time()))}.</p>\n{body}\n</body></html>\n"
    )


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
            elif match := QA_ROUTE.match(url.path):
                png = site.qa_png(int(match.group(1)))
                if png is None:
                    self._send(HTTPStatus.NOT_FOUND, "text/plain", b"no snapshot for this job\n")
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

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        log.debug("http_request", client=self.client_address[0], request=format % args)


def _limit(query: str) -> int:
    values = parse_qs(query).get("limit") or []
    try:
        return max(1, min(int(values[0]), MAX_JOBS)) if values else DEFAULT_JOBS
    except ValueError:
        return DEFAULT_JOBS


class _Server(ThreadingHTTPServer):
    daemon_threads = True
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
        server = server_class((self.config.host, self.config.port), _Handler)
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
