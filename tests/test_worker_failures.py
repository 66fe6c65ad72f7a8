"""How the worker turns each kind of failure into a job state, a reason and a log line.

In process, with the series load or the engine made to raise: a failure of the
series is held or failed at once with its reason; one a later attempt can pass,
or one not foreseen, is deferred with backoff (quarantined when its attempts
are spent). The daemon-level story is in ``test_job_failures``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import structlog

from oncoseg_node import errors
from oncoseg_node.ledger import JobState
from oncoseg_node.ops import worker as worker_module
from oncoseg_node.ops.worker import Worker, retry_delay


class Ledger:
    """The calls the worker makes on a failing job, recorded."""

    def __init__(self, deferred_to: JobState = JobState.QUEUED) -> None:
        self.deferred_to = deferred_to
        self.updates: list[tuple[str | None, dict[str, Any]]] = []
        self.deferred: list[tuple[str, float, int]] = []

    def series_instances(self, series_uid: str) -> list[str]:
        return []

    def update_job(self, job_id: int, *, state: str | None = None, **fields: Any) -> None:
        self.updates.append((state, fields))

    def defer_job(self, job_id: int, reason: str, *, delay_s: float,
                  max_attempts: int) -> JobState:
        self.deferred.append((reason, delay_s, max_attempts))
        return self.deferred_to


JOB = SimpleNamespace(id=7, series_uid="1.2.3", calling_ae="CT", version=1, attempts=2,
                      override_geometry=0, override_finding=None)


def run(make_config, monkeypatch, *, load: BaseException | None = None,
        segment: BaseException | None = None, ledger: Ledger | None = None
        ) -> tuple[Ledger, list[dict[str, Any]]]:
    """Process JOB with the load or the engine raising; the ledger calls and the logs."""
    def load_ct_series(*args: Any, **kwargs: Any) -> Any:
        if load is not None:
            raise load
        return (SimpleNamespace(hu_note=None, header={}), SimpleNamespace(overridden=None))

    def contour(*args: Any) -> Any:
        assert segment is not None
        raise segment

    monkeypatch.setattr(worker_module, "load_ct_series", load_ct_series)
    monkeypatch.setattr(worker_module, "contour", contour)
    protocol = SimpleNamespace(name="thorax")
    protocols = SimpleNamespace(version="v1", match=lambda header, ae: protocol)
    ledger = ledger or Ledger()
    spool = SimpleNamespace(path=lambda relpath: relpath)
    worker = Worker(make_config(), ledger, spool, None, lambda: protocols)
    with structlog.testing.capture_logs() as logs:
        worker._process(JOB)
    return ledger, [entry for entry in logs if entry["event"] != "job_started"]


@pytest.mark.parametrize(("error", "state", "reason", "level", "logged"), [
    (errors.GeometryError("gantry tilt"), JobState.HELD, "geometry: gantry tilt", "warning",
     "gantry tilt"),
    (errors.RTStructError("no contour"), JobState.HELD, "structure set check: no contour", "error",
     "no contour"),
    (errors.PixelDecodeError("JPEG broken"), JobState.HELD, "pixel data: JPEG broken", "error",
     "JPEG broken"),
    (errors.SeriesLoadError("not a CT"), JobState.FAILED, "series: not a CT", "error", "not a CT"),
    (errors.EngineError("no weights"), JobState.FAILED, "engine: no weights", "error",
     "engine: no weights"),
])
def test_a_failure_of_the_series_is_held_or_failed_at_once(make_config, monkeypatch, error,
                                                           state, reason, level, logged):
    ledger, logs = run(make_config, monkeypatch, load=error)
    assert ledger.updates == [(state, {"reason": reason})] and ledger.deferred == []
    (entry,) = logs
    assert entry["event"] == f"job_{state}" and entry["log_level"] == level
    assert entry["reason"] == logged
    assert entry.get("exc_info", False) is isinstance(error, errors.EngineError)


def test_an_engine_crash_fails_the_job_naming_the_error(make_config, monkeypatch):
    ledger, logs = run(make_config, monkeypatch, segment=ZeroDivisionError("division by zero"))
    assert ledger.updates[-1] == (JobState.FAILED,
                                  {"reason": "engine: ZeroDivisionError: division by zero"})
    assert [(e["event"], e["log_level"], e.get("exc_info")) for e in logs] == [
        ("job_failed", "error", True)]


@pytest.mark.parametrize(("where", "error", "retryable"), [
    ("load", OSError("disk full"), True),
    ("load", ValueError("unforeseen"), False),
    ("segment", MemoryError("out of memory"), True),
    ("segment", errors.OncosegError("raised on purpose, not by the engine"), False),
])
def test_a_failure_a_later_attempt_can_pass_is_deferred_with_backoff(
        make_config, monkeypatch, where, error, retryable):
    ledger, logs = run(make_config, monkeypatch, **{where: error})
    config = make_config()
    assert ledger.deferred == [(f"{type(error).__name__}: {error}",
                                retry_delay(config.series, JOB.attempts),
                                config.series.max_attempts)]
    assert [u for u in ledger.updates if u[0] is not None] == []
    (entry,) = logs
    assert (entry["event"], entry["log_level"], entry["exc_info"]) == ("job_deferred", "error",
                                                                      True)
    assert entry["retryable"] is retryable and entry["attempts"] == JOB.attempts


def test_a_job_whose_attempts_are_spent_is_quarantined(make_config, monkeypatch):
    ledger, logs = run(make_config, monkeypatch, load=OSError("disk full"),
                       ledger=Ledger(deferred_to=JobState.QUARANTINED))
    assert len(ledger.deferred) == 1
    assert [(e["event"], e["attempts"]) for e in logs] == [("job_quarantined", JOB.attempts)]
