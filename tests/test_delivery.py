"""Delivery against real peers: DCMTK storescp with fault injection, and a
pynetdicom SCP that answers failure statuses."""

from __future__ import annotations

import threading

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, RTStructureSetStorage

from oncoseg_node.config import RetryConfig, load_config
from oncoseg_node.delivery.scheduler import DeliveryScheduler, backoff_delay
from oncoseg_node.delivery.sender import SendResult
from oncoseg_node.dicom import status
from oncoseg_node.ledger import DeliveryState, JobState, Ledger
from oncoseg_node.ops.metrics import NodeMetrics
from tests.conftest import write_config
from tests.ctfactory import encode, series
from tests.daemon import wait_until
from tests.peers import free_port, storescp

pytestmark = pytest.mark.peers

FAST = {"first_delay_s": 0.2, "max_delay_s": 1.0}


def destination(name: str, port: int, **extra) -> dict:
    return {"name": name, "ae_title": "TPS", "host": "127.0.0.1", "port": port,
            "timeout_s": 2, "retry": FAST, **extra}


def queued_delivery(tmp_path, destinations: list[dict]):
    """A job with a written object and one pending delivery per destination."""
    cfg = load_config(write_config(tmp_path, destinations=destinations))
    ledger = Ledger(cfg.ledger_path)
    ds = series(1)[0]
    ledger.record_instance(sop_instance_uid="1.1", series_uid="1.2", study_uid="1.3",
                           sop_class_uid=CTImageStorage, relpath="objects/x", sha256="0",
                           size=1, calling_ae="CT")
    job_id = ledger.close_series("1.2")
    ledger.claim(3)
    (cfg.state_dir / "outbox").mkdir(parents=True)
    (cfg.state_dir / "outbox" / "rs.dcm").write_bytes(encode(ds))
    ledger.start_deliveries(job_id, [(d["name"], str(ds.SOPInstanceUID), "outbox/rs.dcm")
                                     for d in destinations])
    return cfg, ledger, job_id, str(ds.SOPInstanceUID)


def run_until_sent(cfg, ledger, job_id, timeout=30):
    return wait_until(lambda: ledger.job(job_id).state == JobState.SENT, timeout, "job sent")


def test_backoff_is_capped_exponential():
    retry = RetryConfig(first_delay_s=10, max_delay_s=900)
    assert [backoff_delay(retry, n) for n in (1, 2, 3, 4, 8, 20)] == [10, 20, 40, 80, 900, 900]


def _fault_then_recover(tmp_path, fault: list[str]):
    port = free_port()
    cfg, ledger, job_id, uid = queued_delivery(tmp_path, [destination("tps", port)])
    scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=0.2)
    tps_dir = tmp_path / "tps"
    with storescp(tps_dir, port=port, extra=fault):
        scheduler.start()
        wait_until(lambda: ledger.deliveries(job_id)[0].attempts >= 1, 30, "first attempt")
        scheduler.stop()
    delivery = ledger.deliveries(job_id)[0]
    assert delivery.state == DeliveryState.PENDING and delivery.reason
    scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=0.2)
    with storescp(tps_dir, port=port):
        scheduler.start()
        try:
            run_until_sent(cfg, ledger, job_id)
        finally:
            scheduler.stop()
    files = list(tps_dir.iterdir())
    assert len(files) == 1
    assert pydicom.dcmread(files[0]).SOPInstanceUID == uid
    return ledger.deliveries(job_id)[0]


def test_refused_association_is_retried_with_the_same_uid(tmp_path):
    delivery = _fault_then_recover(tmp_path, ["--refuse"])
    assert delivery.state == DeliveryState.DELIVERED and delivery.attempts >= 2


def test_abort_after_store_is_retried_and_tps_ends_with_one_object(tmp_path):
    delivery = _fault_then_recover(tmp_path, ["--abort-after"])
    assert delivery.state == DeliveryState.DELIVERED and delivery.attempts >= 2


def test_tps_slower_than_our_timeout_is_retried(tmp_path):
    delivery = _fault_then_recover(tmp_path, ["--sleep-during", "4"])
    assert delivery.state == DeliveryState.DELIVERED and delivery.attempts >= 2


def test_one_destination_down_does_not_delay_another(tmp_path):
    down = free_port()
    up = free_port()
    cfg, ledger, job_id, _ = queued_delivery(
        tmp_path, [destination("down", down, timeout_s=5), destination("up", up)])
    scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=0.2)
    with storescp(tmp_path / "up", port=up):
        scheduler.start()
        try:
            wait_until(lambda: {d.destination: d.state for d in ledger.deliveries(job_id)}
                       .get("up") == DeliveryState.DELIVERED, 5,
                       "the healthy destination to receive")
        finally:
            scheduler.stop(wait=False)
    states = {d.destination: d.state for d in ledger.deliveries(job_id)}
    assert states == {"up": DeliveryState.DELIVERED, "down": DeliveryState.PENDING}


class FailingScp:
    """A pynetdicom Storage SCP answering a chosen status (a peer, not our code)."""

    def __init__(self, answer: int) -> None:
        self.answer = answer
        self.received: list[str] = []
        self.ae = AE(ae_title="TPS")
        self.ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
        self.ae.add_supported_context(RTStructureSetStorage, [ExplicitVRLittleEndian])
        self.port = 0  # bound on entry
        self.lock = threading.Lock()

    def handle(self, event):
        with self.lock:
            self.received.append(str(event.request.AffectedSOPInstanceUID))
            return self.answer

    def __enter__(self):
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self.handle)])
        self.port = int(self.server.server_address[1])
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def test_permanent_failure_ends_delivery_with_reason_then_retry_sends(tmp_path):
    with FailingScp(status.CANNOT_UNDERSTAND) as tps:
        cfg, ledger, job_id, uid = queued_delivery(tmp_path, [destination("tps", tps.port)])
        scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=0.2)
        metrics = NodeMetrics()
        metrics.add(scheduler.metrics.collectors())
        scheduler.start()
        try:
            wait_until(lambda: ledger.job(job_id).state == JobState.FAILED, 10, "job failed")
            delivery = ledger.deliveries(job_id)[0]
            assert delivery.attempts == 1  # no retry loop on a permanent failure
            assert delivery.last_status == status.CANNOT_UNDERSTAND
            assert "0xC000" in delivery.reason and "cannot understand" in delivery.reason.lower()
            assert "0xC000" in (ledger.job(job_id).reason or "")
            assert metrics.value("oncoseg_deliveries_failed_total", destination="tps") == 1
            tps.answer = status.SUCCESS
            assert ledger.retry_deliveries(job_id) == 1
            run_until_sent(cfg, ledger, job_id)
        finally:
            scheduler.stop()
        assert tps.received == [uid, uid]
        # the resend that succeeded is not a failure
        assert metrics.value("oncoseg_deliveries_failed_total", destination="tps") == 1


def test_warning_counts_as_delivered(tmp_path):
    with FailingScp(status.COERCION_OF_DATA_ELEMENTS) as tps:
        cfg, ledger, job_id, _ = queued_delivery(tmp_path, [destination("tps", tps.port)])
        scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=0.2)
        scheduler.start()
        try:
            run_until_sent(cfg, ledger, job_id)
        finally:
            scheduler.stop()
    assert ledger.deliveries(job_id)[0].last_status == status.COERCION_OF_DATA_ELEMENTS


def test_out_of_resources_is_transient(tmp_path):
    with FailingScp(status.OUT_OF_RESOURCES) as tps:
        cfg, ledger, job_id, _ = queued_delivery(tmp_path, [destination("tps", tps.port)])
        scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=0.2)
        scheduler.start()
        try:
            wait_until(lambda: ledger.deliveries(job_id)[0].attempts >= 3, 15, "3 attempts")
            tps.answer = status.SUCCESS
            run_until_sent(cfg, ledger, job_id)
        finally:
            scheduler.stop()


def test_outage_across_restarts_delivers_once_tps_is_back(tmp_path):
    """An outage compressed in time: backoff 0.2 s..1 s stands for 10 s..900 s,
    so ~10 s of outage with two restarts of the delivery side stands for hours."""
    port = free_port()
    cfg, ledger, job_id, uid = queued_delivery(tmp_path, [destination("tps", port)])
    for _ in range(3):  # first run + two restarts while the TPS is down
        scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=0.2)
        scheduler.start()
        before = ledger.deliveries(job_id)[0].attempts
        wait_until(lambda b=before, led=ledger: led.deliveries(job_id)[0].attempts >= b + 2, 20,
                   "retries while down")
        scheduler.stop()
        ledger.close()
        ledger = Ledger(cfg.ledger_path)
    assert ledger.deliveries(job_id)[0].state == DeliveryState.PENDING
    scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=0.2)
    with storescp(tmp_path / "tps", port=port):
        scheduler.start()
        try:
            run_until_sent(cfg, ledger, job_id)
        finally:
            scheduler.stop()
    files = list((tmp_path / "tps").iterdir())
    assert len(files) == 1 and pydicom.dcmread(files[0]).SOPInstanceUID == uid


def test_storage_commitment_with_a_real_orthanc_confirms_the_delivery(tmp_path, make_config):
    """Orthanc as the TPS: it stores the object, accepts the N-ACTION and reports
    the commitment on its own association back to the node's listener."""
    from oncoseg_node.delivery.commitment import CommitmentReports
    from oncoseg_node.intake.handlers import StoreHandlers
    from oncoseg_node.intake.spool import Spool
    from oncoseg_node.intake.transport import Receiver
    from tests.orthanc_peer import orthanc

    node_port = free_port()
    with orthanc(tmp_path / "orthanc",
                 modalities={"oncoseg": ("ONCOSEG", "127.0.0.1", node_port)}) as tps:
        dest = destination("tps", tps.dicom_port, storage_commitment=True)
        dest["ae_title"] = tps.aet
        _, ledger, job_id, uid = queued_delivery(tmp_path, [dest])
        cfg = load_config(write_config(tmp_path, destinations=[dest], node={"port": node_port}))
        receiver = Receiver(cfg.node, StoreHandlers(cfg.node, cfg.series, Spool(cfg.spool_dir),
                                                    ledger),
                            extra=[CommitmentReports(ledger).service()])
        receiver.start()
        scheduler = DeliveryScheduler(cfg, ledger, reconcile_interval_s=0.2)
        scheduler.start()
        try:
            run_until_sent(cfg, ledger, job_id, timeout=60)
        finally:
            scheduler.stop()
            receiver.stop_accepting()
        delivery = ledger.deliveries(job_id)[0]
        assert delivery.transaction_uid and delivery.stored_at
        assert delivery.reason == "committed by destination"
        instances = tps.get("/instances?expand")
        assert [i["MainDicomTags"]["SOPInstanceUID"] for i in instances] == [uid]


def test_permanent_failure_shows_in_status_and_cli_retry_delivers(tmp_path):
    """Through the daemon and its CLI: the reason is visible, `retry` sends again."""
    from oncoseg_node.commissioning.phantom import write_phantom
    from tests.daemon import Daemon
    from tests.peers import storescu

    write_phantom(tmp_path / "ct", slices=8, rows=96, columns=96, pixel_spacing=(4.0, 4.0))
    with FailingScp(status.DATASET_DOES_NOT_MATCH_SOP_CLASS) as tps:
        config = write_config(tmp_path, destinations=[destination("tps", tps.port)])
        daemon = Daemon(config, 0, tmp_path / "daemon.log").start()
        try:
            assert storescu(tmp_path / "ct", daemon.port).returncode == 0
            (job,) = wait_until(
                lambda: [j for j in daemon.status() if j["state"] == JobState.FAILED],
                90, "failed job")
            text = daemon.cli("status").stdout
            assert "failed" in text and "0xA900" in text
            assert job["deliveries"][0]["status"] == status.DATASET_DOES_NOT_MATCH_SOP_CLASS
            tps.answer = status.SUCCESS
            proc = daemon.cli("retry", str(job["job"]))
            assert proc.returncode == 0, proc.stderr
            wait_until(lambda: [j for j in daemon.status() if j["state"] == JobState.SENT], 30,
                       "job sent after retry")
            refused = daemon.cli("retry", str(job["job"]))
            assert refused.returncode == 1 and "no failed or pending" in refused.stderr
        finally:
            daemon.stop()
    assert len(tps.received) == 2 and tps.received[0] == tps.received[1]


def test_destination_refusing_the_sop_class_is_a_permanent_failure(tmp_path):
    from oncoseg_node.delivery.sender import send_file

    scp = FailingScp(status.SUCCESS)
    scp.ae = AE(ae_title="TPS")
    scp.ae.add_supported_context(RTStructureSetStorage, [ExplicitVRLittleEndian])
    with scp:
        cfg, _, _, _ = queued_delivery(tmp_path, [destination("tps", scp.port)])
        outcome = send_file(cfg.state_dir / "outbox" / "rs.dcm", cfg.destinations[0], "ONCOSEG")
    assert outcome.result == SendResult.FAILED
    assert "CT Image Storage" in outcome.reason and "rejected" in outcome.reason


def test_send_outcome_is_one_named_result(tmp_path):
    from oncoseg_node.delivery.sender import send_file

    port = free_port()
    cfg, _, _, uid = queued_delivery(tmp_path, [destination("tps", port)])
    path, dest = cfg.state_dir / "outbox" / "rs.dcm", cfg.destinations[0]
    nobody = send_file(path, dest, "ONCOSEG")  # nothing listens yet
    assert nobody.result == SendResult.RETRY and nobody.status is None
    with storescp(tmp_path / "tps", port=port):
        stored = send_file(path, dest, "ONCOSEG")
    assert stored.result == SendResult.DELIVERED and stored.status == status.SUCCESS
    for outcome in (nobody, stored):
        assert not hasattr(outcome, "delivered") and not hasattr(outcome, "transient")
