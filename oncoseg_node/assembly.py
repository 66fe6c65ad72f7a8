"""Series bookkeeping: decides when a received series is complete.

A series is complete when no instance has arrived for ``quiet_period_s``.
The state lives in the ledger (``series`` table), so a series still in its
quiet period when the daemon is killed is closed into exactly one job after
restart. Instances arriving after a job started reopen the series and, once
quiet again, produce a new version of the job (never a split series).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from .jobqueue import Ledger

log = structlog.get_logger("oncoseg_node.assembly")


class Assembler:
    """Closes quiet series into jobs; ``poll`` is called on a timer."""

    def __init__(self, ledger: Ledger, quiet_period_s: float,
                 on_job: Callable[[int], None] | None = None) -> None:
        self.ledger = ledger
        self.quiet_period_s = quiet_period_s
        self.on_job = on_job or (lambda job_id: None)

    def poll(self) -> list[int]:
        """Close every series quiet for long enough; returns new job ids."""
        now = self.ledger.clock()
        created = []
        for row in self.ledger.open_series():
            quiet_for = now - row["last_received_at"]
            if quiet_for < self.quiet_period_s:
                continue
            job_id = self.ledger.close_series(row["series_uid"])
            bound = log.bind(series_uid=row["series_uid"], calling_ae=row["calling_ae"])
            if job_id is None:
                bound.info("series_complete_joined_queued_job", instances=row["instance_count"],
                           reason=f"quiet for {quiet_for:.1f} s")
                continue
            bound.info("series_complete", job_id=job_id, instances=row["instance_count"],
                       reason=f"quiet for {quiet_for:.1f} s", audit=True)
            created.append(job_id)
            self.on_job(job_id)
        return created

    def run(self, stop: threading.Event, interval_s: float = 0.25) -> None:
        while not stop.wait(interval_s):
            try:
                self.poll()
            except Exception:  # keep assembling; the ledger error is logged with context
                log.exception("assembly_poll_failed")
