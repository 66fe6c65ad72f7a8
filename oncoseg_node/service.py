"""The daemon's lifecycle: builds every part, starts and stops them in a fixed order.

Start: ledger (interrupted jobs requeued) -> spool (partial files removed)
-> protocols -> engines (model loaded once; failures are fatal here) ->
delivery scheduler -> assembler and worker -> listener -> READY=1.
Stop (SIGTERM/SIGINT only set a flag): stop accepting -> let associations in
flight finish up to the deadline -> stop claiming -> wait for the job in
flight up to the deadline (an unfinished one is requeued at next start) ->
stop deliveries -> close the ledger.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable

import structlog

from .assembly import Assembler
from .config import Config
from .delivery import DeliveryScheduler
from .dicom.receiver import Receiver, StoreHandlers
from .dicom.spool import Spool
from .engines.registry import EngineSet, build_engines
from .jobqueue import Ledger
from .notify import Notifier
from .protocols import ProtocolSet, load_protocols
from .worker import Worker

log = structlog.get_logger("oncoseg_node.service")

SHUTDOWN_DEADLINE_S = 60.0


class Service:
    def __init__(self, config: Config, *, notifier: Notifier | None = None,
                 engines: EngineSet | None = None,
                 shutdown_deadline_s: float = SHUTDOWN_DEADLINE_S) -> None:
        self.config = config
        self.notifier = notifier or Notifier()
        self.shutdown_deadline_s = shutdown_deadline_s
        self._engines = engines
        self.stop_requested = threading.Event()
        self._stop_work = threading.Event()
        self._threads: list[threading.Thread] = []
        self.ledger: Ledger | None = None
        self.receiver: Receiver | None = None
        self.worker: Worker | None = None
        self.delivery: DeliveryScheduler | None = None
        self._protocols: ProtocolSet | None = None

    def current_protocols(self) -> ProtocolSet:
        assert self._protocols is not None
        return self._protocols

    def start(self) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.ledger = Ledger(cfg.ledger_path)
        requeued = self.ledger.requeue_interrupted()
        spool = Spool(cfg.spool_dir)
        partials = spool.clean_partials()
        log.info("ledger_open", path=str(cfg.ledger_path), requeued_jobs=requeued,
                 partial_files_removed=partials)
        self._protocols = load_protocols(cfg.protocols)
        engines = self._engines or build_engines(cfg.engine)
        self.delivery = DeliveryScheduler(cfg, self.ledger)
        self.delivery.start()
        handlers = StoreHandlers(cfg.node, cfg.series, spool, self.ledger)
        assembler = Assembler(self.ledger, cfg.series.quiet_period_s,
                              association_open=handlers.associations.is_open)
        self.worker = Worker(cfg, self.ledger, spool, engines, self.current_protocols)
        self._spawn("assembler", lambda: assembler.run(self._stop_work))
        self._spawn("worker", lambda: self.worker.run(self._stop_work))
        self.receiver = Receiver(cfg.node, handlers)
        self.receiver.start()
        self.notifier.ready(f"listening on {cfg.node.host}:{self.receiver.port}")
        log.info("started", engines=engines.description, protocols_version=self._protocols.version)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: object) -> None:
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def run_until_stopped(self) -> None:
        """Main loop: pets the systemd watchdog while every part is alive."""
        interval = Notifier.watchdog_interval_s()
        tick = min(interval, 1.0) if interval else 1.0
        while not self.stop_requested.wait(tick):
            if interval and all(t.is_alive() for t in self._threads):
                self.notifier.watchdog()
        self.shutdown()

    def shutdown(self) -> None:
        deadline = time.monotonic() + self.shutdown_deadline_s
        self.notifier.stopping()
        log.info("stopping", deadline_s=self.shutdown_deadline_s)
        if self.receiver is not None:
            self.receiver.stop_accepting()
            while self.receiver.active_associations() and time.monotonic() < deadline:
                time.sleep(0.1)
        self._stop_work.set()
        for thread in self._threads:
            thread.join(timeout=max(deadline - time.monotonic(), 0.1))
        if self.worker is not None and self.worker.busy.is_set():
            log.warning("job_in_flight_left_for_requeue")
        if self.delivery is not None:
            self.delivery.stop(wait=True)
        if self.ledger is not None:
            self.ledger.close()
        log.info("stopped")
