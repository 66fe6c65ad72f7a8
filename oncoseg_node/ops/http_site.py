"""What the HTTP pages read: the ledger, the spool, the state directory and the service.

:class:`StatusSite` answers each route with data (bytes, a page, or None for
"no such thing"); who may ask, and the HTTP around it, are
:mod:`oncoseg_node.ops.http`'s.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import structlog

from oncoseg_node.contouring.pipeline import load_ct_series
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import Job, Ledger
from oncoseg_node.ops.jobs_page import JobView, render_job_page, render_jobs_page
from oncoseg_node.ops.qa import qa_relpath
from oncoseg_node.ops.status import series_header
from oncoseg_node.ops.viewer import JobViewer, ViewerCache
from oncoseg_node.rtstruct.reader import rasterize_crops, read_structure_set

log = structlog.get_logger("oncoseg_node.ops.http")

DEFAULT_JOBS = 50
MAX_JOBS = 500


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
