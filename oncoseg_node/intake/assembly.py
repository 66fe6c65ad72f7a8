"""Series bookkeeping: decides when a received series is complete.

The quiet period (no new instance for ``quiet_period_s``) is the deciding
signal; the others refine it and every decision is logged with all of them:
whether an association carrying the series is still open, the instance
count, gaps in the InstanceNumber run and ImagesInAcquisition. Evidence of
missing instances while the scanner is still connected extends the wait (up
to ``MAX_WAIT_FACTOR`` quiet periods); it never closes a series early,
because one series may arrive over several associations. Slice-position gaps
are judged later by the geometry gate, which holds the job.

The state lives in the ledger (``series`` table), so a series still in its
quiet period when the daemon is killed is closed into exactly one job after
restart. Instances arriving after a job started reopen the series and, once
quiet again, produce a new version of the job (never a split series).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from oncoseg_node.ledger import Ledger

log = structlog.get_logger("oncoseg_node.intake.assembly")

MAX_WAIT_FACTOR = 3.0
FAILING_AFTER = 2  # polls failed in a row before the assembler counts as failing


@dataclass(frozen=True)
class Decision:
    close: bool
    reason: str
    incomplete: bool = False


def decide(*, quiet_for: float, quiet_period: float, count: int, numbers: list[int],
           expected: int | None, association_open: bool) -> Decision:
    """Combine the completeness signals for one series."""
    if quiet_for < quiet_period:
        return Decision(False, f"quiet for {quiet_for:.1f} s of {quiet_period:.1f} s")
    signals = [f"quiet for {quiet_for:.1f} s",
               "association still open" if association_open else "association ended",
               f"{count} instances"]
    missing = []
    if expected is not None and count < expected:
        missing.append(f"ImagesInAcquisition is {expected}")
    if numbers:
        span = numbers[-1] - numbers[0] + 1
        if span > len(set(numbers)):
            missing.append(f"InstanceNumber {numbers[0]}-{numbers[-1]} has "
                           f"{span - len(set(numbers))} gap(s)")
        else:
            signals.append(f"InstanceNumber {numbers[0]}-{numbers[-1]} contiguous")
    if missing and association_open and quiet_for < MAX_WAIT_FACTOR * quiet_period:
        return Decision(False, "; ".join(signals + missing) + ": waiting for the rest",
                        incomplete=True)
    reason = "; ".join(signals + missing)
    if missing:
        reason += " (incomplete evidence: the geometry gate decides)"
    return Decision(True, reason, incomplete=bool(missing))


class Assembler:
    """Closes complete series into jobs; ``poll`` is called on a timer."""

    def __init__(self, ledger: Ledger, quiet_period_s: float,
                 association_open: Callable[[str], bool] | None = None,
                 on_job: Callable[[int], None] | None = None) -> None:
        self.ledger = ledger
        self.quiet_period_s = quiet_period_s
        self.association_open = association_open or (lambda series_uid: False)
        self.on_job = on_job or (lambda job_id: None)
        self._waiting_logged: set[str] = set()
        self.failures_in_a_row = 0
        self.last_failure: str | None = None

    def healthy(self) -> bool:
        """False while polls keep failing (a full disk, a broken ledger): for ``/healthz``.

        One failed poll may be a passing lock; two in a row is a part that fails.
        """
        return self.failures_in_a_row < FAILING_AFTER

    def poll(self) -> list[int]:
        """Close every series judged complete; returns new job ids."""
        now = self.ledger.clock()
        created = []
        for row in self.ledger.open_series():
            series_uid = row["series_uid"]
            quiet_for = now - row["last_received_at"]
            if quiet_for < self.quiet_period_s:
                continue
            numbers, expected = self.ledger.series_evidence(series_uid)
            decision = decide(quiet_for=quiet_for, quiet_period=self.quiet_period_s,
                              count=row["instance_count"], numbers=numbers, expected=expected,
                              association_open=self.association_open(series_uid))
            bound = log.bind(series_uid=series_uid, calling_ae=row["calling_ae"])
            if not decision.close:
                if series_uid not in self._waiting_logged:
                    bound.info("series_waiting", reason=decision.reason)
                    self._waiting_logged.add(series_uid)
                continue
            self._waiting_logged.discard(series_uid)
            job_id = self.ledger.close_series(series_uid)
            if job_id is None:
                bound.info("series_complete_joined_queued_job", reason=decision.reason)
                continue
            bound.info("series_received", job_id=job_id, instances=row["instance_count"],
                       reason=decision.reason, audit=True)
            created.append(job_id)
            self.on_job(job_id)
        return created

    def run(self, stop: threading.Event, interval_s: float = 0.25) -> None:
        while not stop.wait(interval_s):
            try:
                self.poll()
                self.failures_in_a_row = 0
            except Exception as exc:  # keep assembling; the error is logged with its traceback
                self.failures_in_a_row += 1
                self.last_failure = f"{type(exc).__name__}: {exc}"
                log.exception("assembly_poll_failed", failures_in_a_row=self.failures_in_a_row)
