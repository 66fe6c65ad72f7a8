"""The daemon's lifecycle: builds every part, starts and stops them in a fixed order.

Start, in an order where a failure changes nothing: protocols validated ->
state directory locked (one node per state directory) -> ledger opened and
checked (series still marked as arriving become interrupted: the node
stopped under them) -> spool (partial files removed, files without a ledger
row registered again from their headers: intake/reconcile.py) -> engines (model loaded once;
failures are fatal here) -> HTTP and DICOM ports bound (HTTP first, so a
conflict stops the node before it has acknowledged any instance) -> only
then interrupted jobs requeued and the delivery scheduler, retention,
protocol watcher, assembler (its quiet clocks started when the DICOM port
was bound) and worker started -> READY=1. A start that
fails before the ports are bound has claimed, requeued or sent nothing:
systemd restarting it over and over cannot quarantine a good series.

Stop (SIGTERM/SIGINT only set a flag; a second one exits at once): stop
accepting -> let associations in flight finish up to the deadline (those
still open then are aborted, so their last instance is never acknowledged)
-> stop claiming -> wait for the job in flight up to the same deadline (an
unfinished one is requeued at next start) -> stop retention and deliveries
-> stop HTTP -> close the ledger -> release the state directory.

The systemd watchdog is petted only while the parts are alive (listener,
ledger, worker making progress, assembler, delivery scheduler, protocol
watcher); ``/healthz`` adds what a restart cannot fix but IT must see: the
assembler failing its polls, the protocols file rejected, the disk below
``node.min_free_disk_mb``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from oncoseg_node.config import Config
from oncoseg_node.contouring.engines.registry import EngineSet, build_engines
from oncoseg_node.contouring.protocol_watch import ProtocolWatcher
from oncoseg_node.contouring.protocols import ProtocolSet
from oncoseg_node.delivery.commitment import CommitmentReports
from oncoseg_node.delivery.scheduler import DeliveryScheduler
from oncoseg_node.durable import private_dir
from oncoseg_node.errors import StartupError
from oncoseg_node.intake.assembly import Assembler
from oncoseg_node.intake.handlers import StoreHandlers
from oncoseg_node.intake.reconcile import reconcile
from oncoseg_node.intake.spool import Spool
from oncoseg_node.intake.transport import Receiver
from oncoseg_node.ledger import DeliveryState, JobState, Ledger
from oncoseg_node.ops.http import HttpServer, StatusSite
from oncoseg_node.ops.metrics import NodeMetrics
from oncoseg_node.ops.notify import Notifier
from oncoseg_node.ops.retention import Retention
from oncoseg_node.ops.statelock import StateLock
from oncoseg_node.ops.worker import Worker

log = structlog.get_logger("oncoseg_node.ops.service")

SHUTDOWN_DEADLINE_S = 60.0
# Exit status after a second SIGTERM/SIGINT: a job in flight is requeued at next start.
EXIT_FORCED = 130
# Liveness: what a restart can fix. The watchdog is petted only while these pass.
LIVENESS_CHECKS = ("listener", "ledger", "worker", "assembler", "delivery", "protocol_watcher")


class Service:
    def __init__(self, config: Config, *, notifier: Notifier | None = None,
                 engines: EngineSet | None = None,
                 shutdown_deadline_s: float = SHUTDOWN_DEADLINE_S,
                 lock: StateLock | None = None) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.shutdown_deadline_s = shutdown_deadline_s
        self._engines = engines
        self.stop_requested = threading.Event()
        self.reload_requested = threading.Event()  # SIGHUP
        self._stop_work = threading.Event()
        self._threads: list[threading.Thread] = []
        self.ledger: Ledger | None = None
        self.receiver: Receiver | None = None
        self.worker: Worker | None = None
        self.delivery: DeliveryScheduler | None = None
        self.retention: Retention | None = None
        self.http: HttpServer | None = None
        self.metrics = NodeMetrics()
        self._protocols: ProtocolWatcher | None = None
        self.lock = lock or StateLock(config.state_dir)
        self.spool: Spool | None = None
        self.assembler: Assembler | None = None

    def current_protocols(self) -> ProtocolSet:
        """The last valid protocol set (hot-reloaded when the file changes)."""
        assert self._protocols is not None
        return self._protocols.current()

    def start(self) -> None:
        """Start every part, or raise with nothing changed (see the module docstring)."""
        cfg = self.config
        # Validated before the state directory exists: a bad file creates nothing.
        self._protocols = ProtocolWatcher(cfg.protocols)
        if not self.lock.held:
            self.lock.acquire()
        try:
            self._start_locked()
        except BaseException:
            self._close_failed_start()
            raise

    def _start_locked(self) -> None:
        cfg = self.config
        private_dir(cfg.state_dir)  # one left open to others by an older release, too
        self.ledger = Ledger(cfg.ledger_path)
        self.spool = spool = Spool(cfg.spool_dir)
        partials = spool.clean_partials()
        # Before the listener binds: no instance is being recorded meanwhile.
        reconciled = reconcile(spool, self.ledger)
        engines = self._engines or build_engines(cfg.engine)
        self.delivery = DeliveryScheduler(cfg, self.ledger)
        self.metrics.add(self.delivery.metrics.collectors())
        self.retention = Retention(cfg.retention, self.ledger, spool)
        # Nothing is receiving before the listener starts: a series still
        # marked as arriving was cut off when the node stopped.
        interrupted = self.ledger.interrupt_arriving()
        if interrupted:
            log.warning("series_interrupted_by_node_stop", series=interrupted,
                        wait_s=cfg.series.interrupted_wait_s)
        self.assembler = assembler = Assembler(
            self.ledger, cfg.series.quiet_period_s,
            interrupted_wait_s=cfg.series.interrupted_wait_s,
            whole_series_senders=cfg.series.whole_series_senders,
            spacing_tolerance_mm=cfg.series.slice_spacing_tolerance_mm)
        handlers = StoreHandlers(cfg.node, cfg.series, spool, self.ledger,
                                 on_association_end=assembler.wake)
        assembler.association_open = handlers.associations.is_open
        commitments = CommitmentReports(self.ledger, on_committed=self.delivery.observe_delivered)
        self.worker = worker = Worker(cfg, self.ledger, spool, engines, self.current_protocols,
                                      deliveries_started=self.delivery.wake)
        assembler.on_job = worker.wake
        self.metrics.add(worker.metrics.collectors())
        self._register_gauges(handlers, spool)
        status = ""
        if cfg.http.enabled:
            self.http = HttpServer(cfg.http, StatusSite(
                ledger=self.ledger, spool=spool, state_dir=cfg.state_dir, health=self.health,
                health_detail=self.health_detail,
                metrics=self.metrics.render, title=f"oncoseg-node {cfg.node.ae_title}"))
            _bind("HTTP", cfg.http.host, cfg.http.port, self.http.start)
            status = f"; http on {cfg.http.host}:{self.http.port}"
        self.receiver = Receiver(cfg.node, handlers, extra=[commitments.service()])
        _bind("DICOM", cfg.node.host, cfg.node.port, self.receiver.start)
        # Quiet time counts from here: every open series' clock starts again.
        assembler.listening()
        # Both ports are ours: only now may jobs change state.
        requeued = self.ledger.requeue_interrupted()
        log.info("ledger_open", path=str(cfg.ledger_path), requeued_jobs=requeued,
                 partial_files_removed=partials, instances_registered=reconciled.registered,
                 files_quarantined=len(reconciled.quarantined))
        self.delivery.start()
        self.retention.start()
        assert self._protocols is not None
        self._protocols.start()
        self._spawn("assembler", lambda: assembler.run(self._stop_work))
        self._spawn("worker", lambda: worker.run(self._stop_work))
        self.notifier.ready(f"listening on {cfg.node.host}:{self.receiver.port}{status}")
        log.info("started", engines=engines.description,
                 protocols_version=self.current_protocols().version)

    def _close_failed_start(self) -> None:
        """Undo a start that failed before any worker ran: close, unbind, unlock."""
        if self.receiver is not None and self.receiver.server is not None:
            self.receiver.stop_accepting()
        if self.http is not None and self.http.alive():
            self.http.stop()
        if self.ledger is not None:
            self.ledger.close()
        self.lock.release()

    def health(self) -> dict[str, bool]:
        """Each part's check, for ``/healthz``: liveness plus what IT must act on."""
        checks = self.liveness()
        assembler = getattr(self, "assembler", None)
        checks["assembler_polls"] = assembler is not None and assembler.healthy()
        checks["protocols_file"] = (self._protocols is not None
                                    and self._protocols.last_rejection is None)
        checks["disk"] = self._disk_ok()
        return checks

    def health_detail(self) -> dict[str, str]:
        """Why each failing check fails, for the ``/healthz`` body."""
        detail: dict[str, str] = {}
        assembler = getattr(self, "assembler", None)
        if assembler is not None and not assembler.healthy():
            detail["assembler_polls"] = (f"{assembler.failures_in_a_row} polls failed in a row: "
                                         f"{assembler.last_failure}")
        if self._protocols is not None and self._protocols.last_rejection is not None:
            detail["protocols_file"] = (f"{self._protocols.last_rejection}; running version "
                                        f"{self._protocols.current().version}")
        spool = getattr(self, "spool", None)
        if spool is not None and not self._disk_ok():
            detail["disk"] = (f"{spool.free_bytes() // 2**20} MB free, "
                              f"node.min_free_disk_mb is {self.config.node.min_free_disk_mb}")
        return detail

    def liveness(self) -> dict[str, bool]:
        """Whether each part runs; the systemd watchdog is petted only while all pass."""
        threads = {t.name: t.is_alive() for t in self._threads}
        try:
            assert self.ledger is not None
            self.ledger.count_jobs_by_state()  # a real query: the file is open and readable
            ledger_ok = True
        except Exception:
            ledger_ok = False
        return {
            "listener": self.receiver is not None and self.receiver.listening,
            "ledger": ledger_ok,
            "worker": threads.get("worker", False) and self.worker is not None
            and self.worker.is_progressing(),
            "assembler": threads.get("assembler", False),
            "delivery": self.delivery is not None and self.delivery.alive(),
            "protocol_watcher": self._protocols is not None and self._protocols.alive(),
        }

    def _disk_ok(self) -> bool:
        spool = getattr(self, "spool", None)
        try:
            return spool is not None and (
                spool.free_bytes() >= self.config.node.min_free_disk_mb * 2**20)
        except OSError:
            return False

    def _register_gauges(self, handlers: StoreHandlers, spool: Spool) -> None:
        """Scrape-time values: read from the parts themselves, so they cannot drift."""
        assert self.ledger is not None
        ledger, metrics = self.ledger, self.metrics

        def jobs_by_state() -> list[tuple[dict[str, str], float]]:
            counts = ledger.count_jobs_by_state()
            return [({"state": state}, counts.get(state, 0)) for state in JobState]

        def pending_by_destination() -> list[tuple[dict[str, str], float]]:
            counts: dict[str, int] = {d.name: 0 for d in self.config.destinations}
            for delivery in ledger.deliveries(state=DeliveryState.PENDING):
                counts[delivery.destination] = counts.get(delivery.destination, 0) + 1
            return [({"destination": name}, n) for name, n in sorted(counts.items())]

        metrics.gauge("oncoseg_instances_received_total",
                      "CT instances stored and acknowledged since the node started.",
                      lambda: [({}, handlers.received)], kind="counter")
        metrics.gauge("oncoseg_instances_refused_total",
                      "Instances refused since the node started, by the DIMSE status answered.",
                      lambda: [({"status": f"0x{code:04X}"}, n)
                               for code, n in handlers.refused_counts().items()], kind="counter")
        metrics.gauge("oncoseg_jobs", "Jobs in the ledger by state.", jobs_by_state)
        metrics.gauge("oncoseg_jobs_held",
                      "Jobs held for an operator (refused by the geometry gate or the structure "
                      "set check): nothing is sent until one releases them.",
                      lambda: [({}, ledger.count_jobs_by_state().get(JobState.HELD, 0))])
        metrics.gauge("oncoseg_queue_depth", "Jobs waiting for the worker (state queued).",
                      lambda: [({}, ledger.count_jobs_by_state().get(JobState.QUEUED, 0))])
        metrics.gauge("oncoseg_series_open", "Series still arriving or in their quiet period.",
                      lambda: [({}, len(ledger.open_series()))])
        metrics.gauge("oncoseg_deliveries_pending",
                      "Structure sets waiting to be accepted, by destination.",
                      pending_by_destination)
        metrics.gauge("oncoseg_disk_free_bytes", "Free bytes on the spool's filesystem.",
                      lambda: [({}, spool.free_bytes())])
        metrics.gauge("oncoseg_associations_active", "DICOM associations open now.",
                      lambda: [({}, len(self._associations()))])
        metrics.gauge("oncoseg_worker_busy", "1 while the worker is contouring a job.",
                      lambda: [({}, int(self.worker is not None and self.worker.busy.is_set()))])
        metrics.gauge("oncoseg_health", "1 when the part passes its liveness check.",
                      lambda: [({"check": k}, int(v)) for k, v in self.health().items()])

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: object) -> None:
            if self.stop_requested.is_set():
                # A second signal: the operator wants out now. Whatever is in
                # flight is requeued at next start; nothing acknowledged is lost.
                os.write(sys.stderr.fileno(),
                         f'{{"event": "forced_exit", "signal": {signum}}}\n'.encode())
                os._exit(EXIT_FORCED)
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        # SIGHUP: re-read the HTTPS certificate and metrics token (renewed certificates).
        signal.signal(signal.SIGHUP, lambda _signum, _frame: self.reload_requested.set())

    def run_until_stopped(self) -> None:
        """Main loop: pets the systemd watchdog while every part is alive."""
        interval = Notifier.watchdog_interval_s()
        tick = min(interval, 1.0) if interval else 1.0
        while not self.stop_requested.wait(tick):
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                if self.http is not None:
                    self.http.reload()
            if interval and all(self.liveness().values()):
                self.notifier.watchdog()
        self.shutdown()

    def shutdown(self) -> None:
        deadline = time.monotonic() + self.shutdown_deadline_s
        self.notifier.stopping()
        log.info("stopping", deadline_s=self.shutdown_deadline_s)
        if self.receiver is not None:
            self.receiver.stop_accepting()
            log.info("stopped_accepting", associations_in_flight=len(self._associations()))
            while self._associations() and time.monotonic() < deadline:
                time.sleep(0.05)
            self._abort_associations()
        self._stop_work.set()
        if self.worker is not None:
            self.worker.wake()
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.1))
        job = self.worker.current if self.worker is not None else None
        if job is not None:
            log.warning("job_in_flight_left_for_requeue", job_id=job.id,
                        series_uid=job.series_uid, calling_ae=job.calling_ae)
        if self._protocols is not None:
            self._protocols.stop()
        if self.retention is not None:
            self.retention.stop(wait=True)
        if self.delivery is not None:
            self.delivery.stop(wait=True)
        if self.http is not None:
            self.http.stop()  # after the parts it reports on, before the ledger it reads
        if self.ledger is not None:
            self.ledger.close()
        self.lock.release()
        log.info("stopped")

    def _associations(self, *, requested_only: bool = True) -> list[Any]:
        """Associations on the listener; by default only those a peer asked for.

        A bare TCP connection (a port probe, a load balancer) carries no
        instance, and pynetdicom keeps it until the ACSE timeout: waiting for
        it would only delay shutdown.
        """
        server = self.receiver.server if self.receiver is not None else None
        if server is None:
            return []
        return [a for a in server.active_associations
                if not requested_only or a.requestor.primitive is not None]

    def _abort_associations(self) -> None:
        """Abort every association still open after the wait (at the deadline).

        The scanner gets no Success for an instance in progress, so it sends
        it again later; an instance already acknowledged is already durable.
        """
        remaining = self._associations(requested_only=False)
        requested = sum(a.requestor.primitive is not None for a in remaining)
        if requested:
            log.warning("associations_aborted_at_deadline", count=requested)
        for assoc in remaining:
            assoc.abort()


def _bind(what: str, host: str, port: int, start: Callable[[], None]) -> None:
    """Bind a listener; an OSError becomes a StartupError naming the address and port."""
    try:
        start()
    except OSError as exc:
        raise StartupError(f"cannot listen for {what} on {host}:{port}: "
                           f"{exc.strerror or exc}") from exc
