"""Retention: received CT instances are purged from the spool once they are old and done.

A series is purged ``retention.max_age_days`` after it was last active (its
last instance, or its last job change, whichever is later), and only when
each of its jobs is finished for good: delivered (``sent``), superseded by a
newer version, skipped or discarded. A series whose delivery is unfinished
(queued, running, delivering, held, failed, quarantined, or with any delivery
still pending) is never touched, however old.

Only what the ledger knows is finished is deleted. A series is marked
``purging``, its files go, then its rows: a crash in between leaves rows
whose files are partly gone, and the next pass finishes the purge. A spool
file without a row is never deleted here (the ledger may have been lost; the
start-up reconciliation in ``intake/reconcile.py`` registers it again).

Jobs, deliveries and written structure sets (``outbox/``) are kept: they are
the record of what was sent, and ``resend`` needs the structure set file.

Runs as an apscheduler interval job (``retention.check_interval_s``), the
first pass right after start.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from apscheduler.schedulers.background import BackgroundScheduler

from oncoseg_node.config import RetentionConfig
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import Ledger

log = structlog.get_logger("oncoseg_node.ops.retention")

DAY_S = 86400.0


@dataclass
class PurgeReport:
    series: list[str] = field(default_factory=list)
    instances: int = 0


class Retention:
    """Purges old, finished spool data on a schedule."""

    def __init__(self, config: RetentionConfig, ledger: Ledger, spool: Spool, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.ledger = ledger
        self.spool = spool
        self.clock = clock
        self._stop = threading.Event()
        self.scheduler = BackgroundScheduler(timezone=UTC)

    def purge(self) -> PurgeReport:
        """One pass: interrupted purges finished, then old finished series. Stops on ``stop``."""
        now = self.clock()
        cutoff = now - self.config.max_age_days * DAY_S
        report = PurgeReport()
        for series_uid in self.ledger.purging_series():
            self._delete(series_uid, self.ledger.series_instances(series_uid), report)
        for series_uid in self.ledger.purgeable_series(cutoff):
            if self._stop.is_set():
                return report
            relpaths = self.ledger.purge_series(series_uid, cutoff)
            if relpaths is None:
                continue  # became active again since the query
            self._delete(series_uid, relpaths, report)
        return report

    def _delete(self, series_uid: str, relpaths: list[str], report: PurgeReport) -> None:
        """Files first, rows second: no file is ever left without its row."""
        for relpath in relpaths:
            self.spool.remove(relpath)
        self.ledger.forget_series(series_uid, relpaths)
        report.series.append(series_uid)
        report.instances += len(relpaths)
        log.info("series_purged", series_uid=series_uid, instances=len(relpaths),
                 max_age_days=self.config.max_age_days, audit=True)

    def _run(self) -> None:
        try:
            self.purge()
        except Exception:  # the next pass tries again; the error is logged in full
            log.exception("retention_pass_failed")

    def start(self) -> None:
        self.scheduler.add_job(self._run, "interval", seconds=self.config.check_interval_s,
                               id="retention", max_instances=1, coalesce=True,
                               next_run_time=datetime.now(UTC))
        self.scheduler.start()

    def stop(self, wait: bool = True) -> None:
        """Stop after the series being purged (a pass in progress ends early)."""
        self._stop.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)
