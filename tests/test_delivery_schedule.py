"""The delivery scheduler's own timing: stopping while it reconciles, and operator retries
replacing a backoff timer. Real ledger, real DCMTK storescp as the planning system."""

from __future__ import annotations

import threading
import time

import pytest
from pynetdicom.sop_class import CTImageStorage

from oncoseg_node.config import load_config
from oncoseg_node.delivery.scheduler import DeliveryScheduler
from oncoseg_node.ledger import Ledger
from tests.conftest import write_config
from tests.ctfactory import encode, series
from tests.daemon import wait_until
from tests.peers import free_port, storescp

pytestmark = pytest.mark.peers


def pending_deliveries(tmp_path, count: int, port: int, *, delay_s: float):
    """``count`` jobs, each with one pending delivery due ``delay_s`` from now."""
    cfg = load_config(write_config(tmp_path, destinations=[
        {"name": "tps", "ae_title": "TPS", "host": "127.0.0.1", "port": port, "timeout_s": 5,
         "retry": {"first_delay_s": 900, "max_delay_s": 900}}]))
    clock = {"offset": 0.0}
    ledger = Ledger(cfg.ledger_path, clock=lambda: time.time() + clock["offset"])
    ds = series(1)[0]
    (cfg.state_dir / "outbox").mkdir(parents=True)
    (cfg.state_dir / "outbox" / "rs.dcm").write_bytes(encode(ds))
    jobs = []
    for i in range(count):
        ledger.record_instance(sop_instance_uid=f"1.1.{i}", series_uid=f"1.2.{i}",
                               study_uid="1.3", sop_class_uid=CTImageStorage,
                               relpath=f"objects/x{i}", sha256="0", size=1, calling_ae="CT")
        job_id = ledger.close_series(f"1.2.{i}")
        ledger.claim(3)
        # Created as if delay_s ago... then due delay_s from now: a backoff in progress.
        clock["offset"] = delay_s
        ledger.start_deliveries(job_id, [("tps", str(ds.SOPInstanceUID), "outbox/rs.dcm")])
        clock["offset"] = 0.0
        jobs.append(job_id)
    return cfg, ledger, jobs


def test_stop_while_a_reconcile_pass_runs_returns(tmp_path):
    """A wake (a job just finished) racing with shutdown must not deadlock the stop.

    apscheduler's shutdown holds its job-store lock while it waits for running
    jobs; a reconcile pass that itself looks up or adds timers would wait for
    that lock for ever.
    """
    cfg, ledger, _ = pending_deliveries(tmp_path, 1000, free_port(), delay_s=900)
    for i in range(20):
        scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=0.2)
        scheduler.start()
        scheduler.wake()
        time.sleep(0.002 * (i % 10))
        stopper = threading.Thread(target=scheduler.stop, daemon=True)
        stopper.start()
        stopper.join(timeout=20)
        assert not stopper.is_alive(), "stop() hung while a reconcile pass was running"


def test_operator_retry_replaces_a_15_minute_backoff_timer(tmp_path):
    port = free_port()
    cfg, ledger, (job_id,) = pending_deliveries(tmp_path, 1, port, delay_s=900)
    tps = tmp_path / "tps"
    scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=1.0)
    with storescp(tps, port=port):
        scheduler.start()
        try:
            time.sleep(2.5)  # a few passes: the 15-minute timer is set and stays
            assert not tps.exists() or not list(tps.iterdir())
            asked = time.monotonic()
            assert ledger.retry_deliveries(job_id) == 1
            wait_until(lambda: tps.exists() and list(tps.iterdir()), 5,
                       "the retried delivery", interval=0.05)
            took = time.monotonic() - asked
            wait_until(lambda: ledger.deliveries(job_id)[0].state == "delivered", 5, "recorded")
        finally:
            scheduler.stop()
    assert took < 5
    assert ledger.deliveries(job_id)[0].attempts == 1 and len(list(tps.iterdir())) == 1
