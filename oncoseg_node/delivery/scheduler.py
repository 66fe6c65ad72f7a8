"""Delivery of written structure sets: one record per (job version, destination).

Attempts are scheduled with apscheduler at each delivery's ``next_attempt_at``
(kept in the ledger, so backoff survives restarts). Every destination has
its own single-thread executor: one that is down never delays another, and
one destination never receives two objects at once.

The ledger is the source of truth for when an attempt runs. A reconcile
pass, every ``reconcile_interval_s`` and whenever :meth:`wake` is called,
compares each pending delivery's ``next_attempt_at`` with the timer it has:
a new delivery gets one, and a delivery whose time was moved from outside
(``oncoseg-node retry`` or ``resend`` set it to now) has its old backoff
timer replaced, so an operator's retry runs within one pass, not after the
backoff.

The reconcile loop is a thread of its own, never an apscheduler job:
apscheduler's shutdown holds its job-store lock while it waits for running
jobs, so a job that adds or looks up timers would deadlock the stop. Stop
therefore ends the loop first, then shuts the scheduler down; attempts never
touch the scheduler.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from prometheus_client import Counter, Histogram
from prometheus_client.registry import Collector
from pydicom.uid import generate_uid

from oncoseg_node.config import Config, DestinationConfig, RetryConfig
from oncoseg_node.delivery.sender import SendOutcome, SendResult, request_commitment, send_file
from oncoseg_node.ledger import DeliveryState, Ledger

log = structlog.get_logger("oncoseg_node.delivery.scheduler")

Sender = Callable[..., SendOutcome]
# Series complete to accepted by the planning system: seconds when all is
# well, up to hours when a destination is down and backoff runs.
DELIVERY_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 900, 1800, 3600, 14400)
# One C-STORE of one structure set.
ATTEMPT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class DeliveryMetrics:
    """What deliveries count; the service serves them on the node's ``/metrics``."""

    def __init__(self) -> None:
        # registry=None: each scheduler's own, never the library's process-global registry
        self.delivery_latency_seconds = Histogram(
            "oncoseg_delivery_latency_seconds",
            "Seconds from series complete (job created) to the destination accepting its "
            "RT Structure Set, retries and backoff included.",
            ["destination"], buckets=DELIVERY_BUCKETS, registry=None)
        self.delivery_attempt_seconds = Histogram(
            "oncoseg_delivery_attempt_seconds",
            "Seconds one delivery attempt (association, C-STORE, release) took.",
            ["destination", "outcome"], buckets=ATTEMPT_BUCKETS, registry=None)
        self.deliveries_failed = Counter(
            "oncoseg_deliveries_failed_total",
            "Deliveries that ended failed (a permanent refusal, or a destination no longer "
            "configured): an operator must resend them.",
            ["destination"], registry=None)

    def collectors(self) -> list[Collector]:
        return [self.delivery_latency_seconds, self.delivery_attempt_seconds,
                self.deliveries_failed]


def backoff_delay(retry: RetryConfig, attempts: int) -> float:
    """Delay before the next try after ``attempts`` failed ones (capped exponential)."""
    return min(retry.max_delay_s, retry.first_delay_s * (2 ** max(attempts - 1, 0)))


class DeliveryScheduler:
    def __init__(self, config: Config, ledger: Ledger, *, sender: Sender = send_file,
                 committer: Callable[..., SendOutcome] = request_commitment,
                 reconcile_interval_s: float = 1.0) -> None:
        self.config = config
        self.metrics = DeliveryMetrics()
        self.ledger = ledger
        self.sender = sender
        self.committer = committer
        self.destinations = {d.name: d for d in config.destinations}
        executors = {f"dest-{name}": ThreadPoolExecutor(1) for name in self.destinations}
        executors["default"] = ThreadPoolExecutor(1)
        self.scheduler = BackgroundScheduler(executors=executors, timezone=UTC)
        self.reconcile_interval_s = reconcile_interval_s
        self._in_flight: set[int] = set()
        self._lock = threading.Lock()
        # delivery id -> the next_attempt_at its timer was set for
        self._timers: dict[int, float] = {}
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._loop: threading.Thread | None = None
        self.last_reconcile_ok = True

    def start(self) -> None:
        self.scheduler.start()
        self.reconcile()
        self._loop = threading.Thread(target=self._reconcile_loop, name="delivery-reconcile",
                                      daemon=True)
        self._loop.start()

    def alive(self) -> bool:
        """Scheduler running, reconcile loop alive and its last pass succeeded."""
        return (self.scheduler.running and self._loop is not None and self._loop.is_alive()
                and self.last_reconcile_ok)

    def wake(self) -> None:
        """Run a reconcile pass now: new deliveries start at once, not at the next tick."""
        self._wake.set()

    def stop(self, wait: bool = True) -> None:
        """End the reconcile loop, then the scheduler (``wait``: let attempts finish)."""
        self._stopping.set()
        self._wake.set()
        if self._loop is not None:
            self._loop.join()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=wait)

    def _reconcile_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.reconcile_interval_s)
            self._wake.clear()
            if self._stopping.is_set():
                return
            try:
                self.reconcile()
                self.last_reconcile_ok = True
            except Exception:  # a locked or failing ledger: the next pass tries again
                self.last_reconcile_ok = False
                log.exception("delivery_reconcile_failed")

    def reconcile(self) -> None:
        """Give each pending delivery one timer, at its ``next_attempt_at`` in the ledger."""
        pending = self.ledger.deliveries(state=DeliveryState.PENDING)
        due = {d.id for d in pending}
        for delivery_id in set(self._timers) - due:  # delivered, failed or discarded
            self._timers.pop(delivery_id, None)
            if self.scheduler.get_job(f"delivery-{delivery_id}"):
                self.scheduler.remove_job(f"delivery-{delivery_id}")
        for delivery in pending:
            if self._stopping.is_set():
                return
            job_id = f"delivery-{delivery.id}"
            with self._lock:
                if delivery.id in self._in_flight:
                    continue
            if (self._timers.get(delivery.id) == delivery.next_attempt_at
                    and self.scheduler.get_job(job_id)):
                continue  # its timer is set for the time the ledger says
            if delivery.destination not in self.destinations:
                self.ledger.record_attempt(
                    delivery.id, state=DeliveryState.FAILED, status=None,
                    reason=f"destination {delivery.destination!r} is no longer configured")
                self.metrics.deliveries_failed.labels(destination=delivery.destination).inc()
                continue
            replaced = self.scheduler.get_job(job_id) is not None  # moved from outside
            run_at = datetime.fromtimestamp(max(delivery.next_attempt_at, 0), tz=UTC)
            self.scheduler.add_job(
                self.attempt, "date", run_date=run_at, args=[delivery.id], id=job_id,
                executor=f"dest-{delivery.destination}", misfire_grace_time=None,
                replace_existing=True,
            )
            self._timers[delivery.id] = delivery.next_attempt_at
            if replaced:
                log.info("delivery_rescheduled", delivery_id=delivery.id, job_id=delivery.job_id,
                         destination=delivery.destination,
                         in_s=round(max(delivery.next_attempt_at - self.ledger.clock(), 0), 1))

    def observe_delivered(self, delivery_id: int) -> None:
        """Record a delivery's latency: from series complete (job created) to accepted.

        Called when the C-STORE succeeds, or for a destination with Storage
        Commitment when its report confirms the object (see the listener).
        """
        delivery = self.ledger.delivery(delivery_id)
        job = self.ledger.job(delivery.job_id) if delivery is not None else None
        if delivery is None or job is None or delivery.delivered_at is None:
            return
        self.metrics.delivery_latency_seconds.labels(destination=delivery.destination).observe(
            max(delivery.delivered_at - job.created_at, 0.0))

    def attempt(self, delivery_id: int) -> None:
        with self._lock:
            self._in_flight.add(delivery_id)
        try:
            self._attempt(delivery_id)
        finally:
            with self._lock:
                self._in_flight.discard(delivery_id)

    def _attempt(self, delivery_id: int) -> None:
        delivery = self.ledger.delivery(delivery_id)
        if delivery is None or delivery.state != DeliveryState.PENDING:
            return
        if delivery.next_attempt_at > self.ledger.clock():
            return  # rescheduled meanwhile; reconcile schedules it again
        dest: DestinationConfig = self.destinations[delivery.destination]
        job = self.ledger.job(delivery.job_id)
        bound = log.bind(job_id=delivery.job_id, series_uid=job.series_uid if job else None,
                         calling_ae=job.calling_ae if job else None,
                         destination=dest.name, sop_instance_uid=delivery.sop_instance_uid)
        path = self.config.state_dir / delivery.relpath
        ae_title = self.config.node.ae_title
        attempts = delivery.attempts + 1
        commitment: tuple[str, float] | None = None
        started = time.monotonic()
        try:
            if delivery.transaction_uid is not None and delivery.stored_at is not None:
                # Stored, but no commitment report within the backoff delay: ask again.
                commitment = (delivery.transaction_uid, delivery.stored_at)
                outcome = self.committer(path, dest, ae_title, delivery.transaction_uid)
            else:
                outcome = self.sender(path, dest, ae_title)
                if outcome.result == SendResult.DELIVERED and dest.storage_commitment:
                    commitment = (generate_uid(), self.ledger.clock())
                    stored = outcome
                    outcome = self.committer(path, dest, ae_title, commitment[0])
                    bound.info("rtstruct_stored_awaiting_commitment", status=stored.reason,
                               transaction_uid=commitment[0])
        except Exception as exc:  # a broken file or socket error must not kill the scheduler
            outcome = SendOutcome(SendResult.RETRY, None, f"{type(exc).__name__}: {exc}")
        self.metrics.delivery_attempt_seconds.labels(
            destination=dest.name, outcome=outcome.result).observe(time.monotonic() - started)
        if commitment is not None and outcome.result != SendResult.FAILED:
            # Committed only when the N-EVENT-REPORT arrives; until then the
            # request is repeated on the backoff schedule.
            delay = backoff_delay(dest.retry, attempts)
            self.ledger.record_attempt(
                delivery_id, state=DeliveryState.PENDING, status=outcome.status,
                reason=outcome.reason if outcome.result != SendResult.DELIVERED
                else "stored; awaiting storage commitment",
                next_attempt_at=self.ledger.clock() + delay, commitment=commitment)
        elif outcome.result == SendResult.DELIVERED:
            self.ledger.record_attempt(delivery_id, state=DeliveryState.DELIVERED,
                                       status=outcome.status, reason=outcome.reason)
            self.observe_delivered(delivery_id)
            bound.info("rtstruct_delivered", attempts=attempts, status=outcome.reason, audit=True)
        elif outcome.result == SendResult.RETRY:
            delay = backoff_delay(dest.retry, attempts)
            self.ledger.record_attempt(delivery_id, state=DeliveryState.PENDING,
                                       status=outcome.status, reason=outcome.reason,
                                       next_attempt_at=self.ledger.clock() + delay)
            bound.warning("delivery_retry_scheduled", attempts=attempts, reason=outcome.reason,
                          delay_s=delay)
        else:
            self.ledger.record_attempt(delivery_id, state=DeliveryState.FAILED,
                                       status=outcome.status, reason=outcome.reason)
            self.metrics.deliveries_failed.labels(destination=dest.name).inc()
            bound.error("delivery_failed", attempts=attempts, reason=outcome.reason)
