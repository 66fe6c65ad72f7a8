"""The worker: claim a job, contour it, write the structure sets, queue deliveries.

Every failure becomes a job state with its reason: a series that cannot be
contoured safely is ``held`` (an operator decides), one with no matching
protocol is ``skipped``, one that cannot be read or that the engine fails on
is ``failed`` at once (the same input fails the same way again). A failure of
the machine rather than the series (disk, memory, I/O: :func:`is_retryable`),
or an unexpected error outside the engine, defers the job with backoff so the
series behind it are contoured meanwhile; its attempt counter moved when it
was claimed, so a job that keeps failing, or keeps crashing the node, ends
``quarantined`` after ``series.max_attempts``.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import Counter, Histogram
from prometheus_client.registry import Collector

from oncoseg_node.config import Config, DestinationConfig, SeriesConfig
from oncoseg_node.contouring.engines.registry import EngineSet
from oncoseg_node.contouring.geometry import GeometryReport
from oncoseg_node.contouring.pipeline import Contoured, contour, load_ct_series
from oncoseg_node.contouring.protocols import Protocol, ProtocolSet
from oncoseg_node.contouring.volume import Volume
from oncoseg_node.doorbell import Doorbell
from oncoseg_node.durable import private_dir
from oncoseg_node.errors import (
    EngineError,
    GeometryError,
    OncosegError,
    PixelDecodeError,
    RTStructError,
    SeriesLoadError,
)
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import Job, JobState, Ledger
from oncoseg_node.ops.qa import overlays_of, qa_relpath, write_qa_snapshot
from oncoseg_node.rtstruct.draft import structure_set_label, write_structure_set
from oncoseg_node.rtstruct.profiles import get_profile

log = structlog.get_logger("oncoseg_node.ops.worker")

# The idle loop claims every quarter second; a claim blocked this long means
# the ledger is stuck (SQLite's own busy timeout is 30 s), not a busy queue.
IDLE_STALL_S = 60.0
# Longest a single job may run before the worker counts as hung. Generous:
# SAM3 on many structures can take minutes, and a false alarm restarts the node.
JOB_STALL_S = 3600.0
# Contouring a CT takes seconds on the classical engine and up to minutes
# with SAM3 on many structures; buckets span both.
SEGMENTATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class WorkerMetrics:
    """What the worker counts; the service serves them on the node's ``/metrics``."""

    def __init__(self) -> None:
        # registry=None: each worker's own, never the library's process-global registry
        self.segmentation_seconds = Histogram(
            "oncoseg_segmentation_seconds",
            "Seconds to contour one series (all engines and sanity flags of one job).",
            buckets=SEGMENTATION_BUCKETS, registry=None)
        self.jobs_finished = Counter(
            "oncoseg_jobs_processed_total",
            "Jobs the worker finished processing, by the state they left the worker in.",
            ["state"], registry=None)

    def collectors(self) -> list[Collector]:
        return [self.segmentation_seconds, self.jobs_finished]


def is_retryable(exc: BaseException) -> bool:
    """Whether a later attempt on the same series can pass: the machine failed, not the input.

    A full or failing disk, memory or GPU memory exhausted by something else,
    a timeout, a ledger busy beyond its timeout. torch's OutOfMemoryError is
    a RuntimeError; it is matched by name so the worker never imports torch.
    """
    return (isinstance(exc, (OSError, MemoryError, TimeoutError, sqlite3.OperationalError))
            or type(exc).__name__ == "OutOfMemoryError")


@dataclass(frozen=True)
class Outcome:
    """What a job failure of one kind does to the job.

    ``state`` None: deferred with backoff (:meth:`Worker._defer`). Otherwise
    the job moves to ``state`` with the reason ``"<reason>: <error>"`` and
    ``job_<state>`` is logged by the logger's method ``level`` (``exception``
    adds the traceback), naming the error alone or, with ``log_reason``, the
    whole reason.
    """

    state: JobState | None
    reason: str = ""
    level: str = "error"
    log_reason: bool = False


DEFERRED = Outcome(None)
# By the error's class, or its nearest base class listed (a PixelDecodeError is
# a SeriesLoadError that is held, not failed). A failure of the series itself
# fails the same way again: held for an operator to decide, or failed at once.
# Anything else is the machine's (is_retryable) or not foreseen: deferred.
FAILURES: dict[type[BaseException], Outcome] = {
    GeometryError: Outcome(JobState.HELD, "geometry", level="warning"),
    RTStructError: Outcome(JobState.HELD, "structure set check"),
    PixelDecodeError: Outcome(JobState.HELD, "pixel data"),
    SeriesLoadError: Outcome(JobState.FAILED, "series"),
    EngineError: Outcome(JobState.FAILED, "engine", level="exception", log_reason=True),
    Exception: DEFERRED,
}


def failure_outcome(exc: BaseException) -> Outcome:
    """The outcome listed in :data:`FAILURES` for ``exc``'s class or its nearest base."""
    return next((FAILURES[cls] for cls in type(exc).__mro__ if cls in FAILURES), DEFERRED)


def retry_delay(series: SeriesConfig, attempts: int) -> float:
    """Wait before attempt ``attempts + 1`` of a deferred job (capped exponential)."""
    return min(series.retry_max_delay_s, series.retry_delay_s * 2 ** max(attempts - 1, 0))


def destinations_for(config: Config, protocol: Protocol) -> list[DestinationConfig]:
    """Shadow mode: a protocol marked ``shadow`` (a new protocol or model under
    evaluation) is sent only to destinations marked ``shadow``, and a normal
    protocol never to them, so a trial runs for weeks beside clinical work
    without reaching the clinical planning system."""
    return [d for d in config.destinations if d.shadow == protocol.shadow]


class Worker:
    def __init__(self, config: Config, ledger: Ledger, spool: Spool, engines: EngineSet,
                 protocols: Callable[[], ProtocolSet], *,
                 deliveries_started: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.deliveries_started = deliveries_started
        self.ledger = ledger
        self.spool = spool
        self.engines = engines
        self.protocols = protocols
        self.metrics = WorkerMetrics()
        self.busy = threading.Event()
        self.doorbell = Doorbell()
        self.current: Job | None = None  # the job in flight, for the shutdown log
        self.last_progress = time.monotonic()

    def is_progressing(self, idle_stall_s: float = IDLE_STALL_S,
                       job_stall_s: float = JOB_STALL_S) -> bool:
        """Whether the loop moved recently: a claim while idle, or a job not yet overdue.

        The service pets the systemd watchdog and answers ``/healthz`` with it.
        """
        limit = job_stall_s if self.busy.is_set() else idle_stall_s
        return time.monotonic() - self.last_progress < limit

    def run_once(self) -> Job | None:
        """Claim and process one job; returns it, or None when the queue is empty."""
        job = self.ledger.claim(self.config.series.max_attempts)
        self.last_progress = time.monotonic()
        if job is None:
            return None
        self.current = job
        self.busy.set()
        try:
            self._process(job)
        finally:
            self.busy.clear()
            self.current = None
            self.last_progress = time.monotonic()
        done = self.ledger.job(job.id)
        if done is not None:
            self.metrics.jobs_finished.labels(state=done.state).inc()
        return done

    def wake(self, *_: object) -> None:
        """A job may be waiting (one was created, the node is stopping): look now."""
        self.doorbell.ring()

    def run(self, stop: threading.Event, idle_wait_s: float = 1.0) -> None:
        # Woken at once by the assembler; the timeout only picks up what another
        # process queued (an operator's release or retry) and deferred jobs coming due.
        while not stop.is_set():
            if self.run_once() is None:
                self.doorbell.wait(idle_wait_s)

    def _process(self, job: Job) -> None:
        bound = log.bind(job_id=job.id, series_uid=job.series_uid, calling_ae=job.calling_ae,
                         version=job.version)
        bound.info("job_started", attempt=job.attempts)
        try:
            self._contour(job, bound)
        except Exception as exc:  # every failure becomes a job state: FAILURES
            outcome = failure_outcome(exc)
            if outcome.state is None:
                self._defer(job, exc, bound)
                return
            reason = f"{outcome.reason}: {exc}"
            self.ledger.update_job(job.id, state=outcome.state, reason=reason)
            getattr(bound, outcome.level)(f"job_{outcome.state}",
                                          reason=reason if outcome.log_reason else str(exc))

    def _contour(self, job: Job, bound: Any) -> None:
        """Load, match, segment and write the job's structure sets; start their deliveries."""
        started = time.monotonic()
        volume, report = self._load(job, bound)
        protocols = self.protocols()
        protocol = protocols.match(volume.header, job.calling_ae)
        if protocol is None:
            self.ledger.update_job(job.id, state=JobState.SKIPPED,
                                   reason="no protocol matches and no fallback is set",
                                   protocol_version=protocols.version)
            bound.info("job_skipped", reason="no protocol matches")
            return
        self.ledger.update_job(job.id, protocol=protocol.name,
                               protocol_version=protocols.version)
        segment_started = time.monotonic()
        contoured = self._segment(volume, report, protocol)
        write_started = time.monotonic()
        self.metrics.segmentation_seconds.observe(write_started - segment_started)
        targets, written = self._write_structure_sets(job, contoured, protocols, protocol)
        first_uid, first_path = next(iter(written.values()), (None, None))
        colors = {s.name: list(s.color) for s in protocol.structures}
        results = [{**row, "color": colors.get(row["name"])} for row in contoured.summary()]
        stages = {"load": round(segment_started - started, 2),
                  "segment": round(write_started - segment_started, 2),
                  "write": round(time.monotonic() - write_started, 2)}
        self.ledger.update_job(job.id, results=results, stage_seconds=stages,
                               rtstruct_uid=first_uid, rtstruct_relpath=first_path)
        self.ledger.start_deliveries(job.id, targets)
        self.deliveries_started()
        # The QA picture is for reviewers: the TPS need not wait for it.
        self._write_snapshot(job, contoured, bound)
        bound.info("job_contoured", protocol=protocol.name,
                   structures=len(contoured.results),
                   absent=[r.name for r in contoured.results if r.absent],
                   seconds=round(time.monotonic() - started, 2),
                   load_s=stages["load"], segment_s=stages["segment"],
                   write_s=stages["write"])

    def _load(self, job: Job, bound: Any) -> tuple[Volume, GeometryReport]:
        """The job's series as one volume, and the geometry gate's report on it."""
        paths = [self.spool.path(p) for p in self.ledger.series_instances(job.series_uid)]
        volume, report = load_ct_series(
            paths, self.config.series.slice_spacing_tolerance_mm,
            override_geometry=bool(job.override_geometry))
        if volume.hu_note:
            bound.warning("hu_clipped", voxels=volume.hu_clipped, note=volume.hu_note)
        if job.override_finding and not report.overridden:
            # released as incomplete: the structure set says what was accepted
            report = dataclasses.replace(report, overridden=job.override_finding)
        if report.overridden:
            bound.warning("geometry_gate_overridden", finding=report.overridden, audit=True)
            self.ledger.update_job(job.id, override_finding=report.overridden)
        return volume, report

    def _segment(self, volume: Volume, report: GeometryReport, protocol: Protocol
                 ) -> Contoured:
        try:
            return contour(volume, report, protocol, self.engines)
        except OncosegError:
            raise
        except Exception as exc:
            if is_retryable(exc):
                raise
            # A deterministic engine on the same volume fails the same way.
            raise EngineError(f"{type(exc).__name__}: {exc}") from exc

    def _write_structure_sets(self, job: Job, contoured: Contoured, protocols: ProtocolSet,
                              protocol: Protocol
                              ) -> tuple[list[tuple[str, str, str]], dict[str, tuple[str, str]]]:
        """One structure set per destination profile; (destination, SOP UID, file) to send.

        Also returns the files written, by profile.
        """
        targets = []
        written: dict[str, tuple[str, str]] = {}
        previous = self._previous_structure_sets(job)
        for dest in destinations_for(self.config, protocol):
            if dest.profile not in written:
                relpath = f"outbox/job{job.id}-v{job.version}-{dest.profile}.dcm"
                path = self.config.state_dir / relpath
                private_dir(path.parent)
                ds = write_structure_set(
                    contoured, protocols, self.engines, get_profile(dest.profile), path,
                    label=structure_set_label(job.id, job.version),
                    predecessor_uid=previous.get(dest.name, previous.get("")))
                written[dest.profile] = (str(ds.SOPInstanceUID), relpath)
            uid, relpath = written[dest.profile]
            targets.append((dest.name, uid, relpath))
        return targets, written

    def _defer(self, job: Job, exc: Exception, bound: Any) -> None:
        """Retry later with backoff; ``quarantined`` once the attempts are spent."""
        series = self.config.series
        delay = retry_delay(series, job.attempts)
        state = self.ledger.defer_job(job.id, f"{type(exc).__name__}: {exc}",
                                      delay_s=delay, max_attempts=series.max_attempts)
        if state == JobState.QUARANTINED:
            bound.exception("job_quarantined", attempts=job.attempts)
        else:
            bound.exception("job_deferred", attempts=job.attempts, retry_in_s=delay,
                            retryable=is_retryable(exc))

    def _previous_structure_sets(self, job: Job) -> dict[str, str]:
        """SOP Instance UIDs of the newest earlier version's structure sets, by destination.

        Key "" is that version's first structure set, for a destination it
        was not sent to. Empty for a series' first version.
        """
        earlier = [j for j in self.ledger.jobs_of_series(job.series_uid)
                   if j.version < job.version and j.rtstruct_uid]
        if not earlier:
            return {}
        newest = max(earlier, key=lambda j: j.version)
        found = {d.destination: d.sop_instance_uid
                 for d in self.ledger.deliveries(job_id=newest.id)}
        found[""] = str(newest.rtstruct_uid)
        return found

    def _write_snapshot(self, job: Job, contoured: Contoured, bound: Any) -> None:
        """The QA picture for the job page, next to the job's outbox files.

        For reviewers only: a failure is logged and never holds up the delivery.
        """
        try:
            write_qa_snapshot(self.config.state_dir / qa_relpath(job.id, job.version),
                              contoured.volume, overlays_of(contoured))
        except Exception:
            bound.exception("qa_snapshot_failed")
