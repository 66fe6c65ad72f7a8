"""SIGTERM: stop accepting, let associations in flight finish, finish or requeue the job, exit.

The daemon runs as a subprocess, a pynetdicom SCU plays the scanner and DCMTK
storescp the planning system. Nothing acknowledged may be lost and nothing
may be done twice, across the stop and two restarts.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from oncoseg_node.config import load_config
from oncoseg_node.contouring.engines.registry import EngineSet
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import JobState, Ledger
from oncoseg_node.ops.service import Service
from tests.conftest import write_config
from tests.ctfactory import ct_slice
from tests.daemon import Daemon, phantom_files, send_until_contouring, tps_destination, wait_until
from tests.peers import storescp, storescu

pytestmark = pytest.mark.peers

SUCCESS = 0x0000


class PacedSender(threading.Thread):
    """One association sending instances with a pause between them, like a slow scanner."""

    def __init__(self, port: int, datasets: list, pause_s: float) -> None:
        super().__init__(daemon=True)
        self.port, self.datasets, self.pause_s = port, datasets, pause_s
        self.acknowledged: list[pydicom.Dataset] = []
        self.statuses: list[int | None] = []
        self.released_at: float | None = None
        self.aborted = False

    def run(self) -> None:
        ae = AE(ae_title="CTSIM")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        assoc = ae.associate("127.0.0.1", self.port, ae_title="ONCOSEG")
        assert assoc.is_established
        for ds in self.datasets:
            try:
                response = assoc.send_c_store(ds)
            except RuntimeError:  # aborted by the node between two instances
                break
            status = getattr(response, "Status", None)
            self.statuses.append(status)
            if status != SUCCESS:
                break
            self.acknowledged.append(ds)
            time.sleep(self.pause_s)
        if assoc.is_established:
            assoc.release()
            self.released_at = time.monotonic()
        self.aborted = assoc.is_aborted


def slices(series_uid: str, count: int) -> list[pydicom.Dataset]:
    return [ct_slice(series_uid=series_uid, study_uid="1.2.3", frame_uid="1.2.4", index=i,
                     size=64) for i in range(count)]


def refused(port: int) -> bool:
    """True once nothing listens on the port.

    A probe caught in the listener's backlog as it closes is reset rather
    than refused: the port is closing, so the next probe decides.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except ConnectionResetError:
        return False
    except ConnectionRefusedError:
        return True


def events(daemon: Daemon) -> list[dict]:
    """The daemon's structlog JSON lines (other lines are pynetdicom's stderr)."""
    return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]


def index_of(records: list[dict], event: str, start: int = 0) -> int:
    return next(i for i, r in enumerate(records) if i >= start and r["event"] == event)


def test_sigterm_during_c_store_finishes_the_association_and_loses_nothing(tmp_path):
    tps = tmp_path / "tps"
    with storescp(tps) as tps_port:
        config = write_config(
            tmp_path, series={"quiet_period_s": 2},
            destinations=[tps_destination(tps_port, retry={"first_delay_s": 1, "max_delay_s": 5})])
        cfg = load_config(config)
        daemon = Daemon(config, 0, tmp_path / "daemon.log").start()
        port = daemon.port
        datasets = slices("1.2.3.77", 120)
        sender = PacedSender(port, datasets, pause_s=0.02)
        sender.start()
        wait_until(lambda: len(sender.acknowledged) >= 20, 30, "the first instances")
        daemon.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        # The listening socket closes at once, while the association carries on.
        wait_until(lambda: refused(port), 5, "the port to close", interval=0.05)
        assert time.monotonic() - signalled < 5 and sender.is_alive()
        sender.join(timeout=60)
        assert daemon.proc.wait(timeout=90) == 0, daemon.log()
        exited = time.monotonic()
        assert sender.statuses == [SUCCESS] * 120 and not sender.aborted
        assert sender.released_at is not None and sender.released_at <= exited

        records = events(daemon)
        stopping = index_of(records, "stopping")
        stopped_accepting = index_of(records, "stopped_accepting", stopping)
        assert records[stopped_accepting]["associations_in_flight"] == 1
        assert index_of(records, "stopped", stopped_accepting) == len(records) - 1

        # Every acknowledged instance is in the ledger and on disk, byte for byte.
        ledger = Ledger(cfg.ledger_path)
        spool = Spool(cfg.spool_dir)
        stored = {str(pydicom.dcmread(spool.path(r)).SOPInstanceUID): spool.path(r)
                  for r in ledger.series_instances("1.2.3.77")}
        ledger.close()
        assert set(stored) == {str(ds.SOPInstanceUID) for ds in datasets}
        assert pydicom.dcmread(stored[str(datasets[-1].SOPInstanceUID)]) == datasets[-1]

        # Restart: the series completes into one job and one structure set reaches the TPS.
        daemon.start()
        try:
            wait_until(lambda: list(tps.iterdir()), 120, f"an RTSTRUCT\n{daemon.log()}")
            jobs = wait_until(
                lambda: [j for j in daemon.status() if j["state"] == JobState.SENT], 30,
                "the job sent")
        finally:
            assert daemon.stop() == 0, daemon.log()
        # And once more: nothing is contoured or sent again.
        daemon.start()
        try:
            time.sleep(4)  # two quiet periods and several delivery reconcile passes
            assert len(daemon.status()) == 1
        finally:
            assert daemon.stop() == 0, daemon.log()
    assert len(jobs) == 1 and len(list(tps.iterdir())) == 1


def test_association_outlasting_the_deadline_is_aborted_without_losing_acknowledged(
        make_config):
    config = make_config(series={"quiet_period_s": 60})
    service = Service(config, engines=EngineSet({}), shutdown_deadline_s=1.5)
    service.start()
    main_loop = threading.Thread(target=service.run_until_stopped, daemon=True)
    main_loop.start()
    datasets = slices("1.2.3.88", 200)
    sender = PacedSender(service.receiver.port, datasets, pause_s=0.1)  # 20 s in all
    sender.start()
    wait_until(lambda: len(sender.acknowledged) >= 5, 30, "the first instances")
    stop_at = time.monotonic()
    service.stop_requested.set()
    main_loop.join(timeout=30)
    assert not main_loop.is_alive()
    assert time.monotonic() - stop_at < 1.5 + 5  # the deadline, plus closing down
    sender.join(timeout=30)
    assert sender.aborted and 5 <= len(sender.acknowledged) < 200
    ledger = Ledger(config.ledger_path)
    recorded = set()
    for relpath in ledger.series_instances("1.2.3.88"):
        recorded.add(str(pydicom.dcmread(Spool(config.spool_dir).path(relpath)).SOPInstanceUID))
    ledger.close()
    # Acknowledged means durable; at most the one instance in progress at the abort
    # is stored without an acknowledgement (the scanner sends it again: a duplicate).
    acknowledged = {str(ds.SOPInstanceUID) for ds in sender.acknowledged}
    assert acknowledged <= recorded and len(recorded - acknowledged) <= 1


def test_sigterm_during_a_job_finishes_it_and_delivers_once(tmp_path):
    tps = tmp_path / "tps"
    files = phantom_files(tmp_path / "phantom")
    with storescp(tps) as tps_port:
        config = write_config(
            tmp_path, series={"quiet_period_s": 1},
            destinations=[tps_destination(tps_port, retry={"first_delay_s": 1, "max_delay_s": 5})])
        daemon = Daemon(config, 0, tmp_path / "daemon.log").start()
        send_until_contouring(daemon, files)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(timeout=120) == 0, daemon.log()
        records = events(daemon)
        stopping = index_of(records, "stopping")
        # The job in flight was finished within the deadline, not abandoned.
        contoured = [i for i, r in enumerate(records) if r["event"] == "job_contoured"]
        assert contoured and contoured[0] > stopping, daemon.log()
        assert not any(r["event"] == "job_in_flight_left_for_requeue" for r in records)
        daemon.start()
        try:
            wait_until(lambda: list(tps.iterdir()), 60, f"the RTSTRUCT\n{daemon.log()}")
            (job,) = wait_until(lambda: [j for j in daemon.status() if j["state"] == JobState.SENT],
                                30, "the job sent")
            time.sleep(3)
        finally:
            assert daemon.stop() == 0, daemon.log()
    assert job["attempts"] == 1 and len(list(tps.iterdir())) == 1


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_job_still_running_at_the_deadline_is_requeued_and_delivered_once(tmp_path):
    """A job that outlasts the deadline is left as it is and done again at next start.

    In a daemon the process exits and takes the worker thread with it; here,
    in one test process, the abandoned worker runs on until it finds the
    ledger closed, and its traceback is expected (hence the filter above).
    """
    files = phantom_files(tmp_path / "phantom")
    tps = tmp_path / "tps"
    with storescp(tps) as tps_port:
        config = load_config(write_config(
            tmp_path, series={"quiet_period_s": 1},
            destinations=[tps_destination(tps_port, retry={"first_delay_s": 1, "max_delay_s": 5})]))
        first = Service(config, shutdown_deadline_s=0.0)
        first.start()
        assert storescu(files, first.receiver.port).returncode == 0
        wait_until(lambda: first.worker.current is not None, 60, "the job to start",
                   interval=0.01)
        first.stop_requested.set()
        first.run_until_stopped()
        ledger = Ledger(config.ledger_path)
        (job,) = ledger.jobs()
        assert job.state == JobState.RUNNING and job.attempts == 1  # left for the next start
        ledger.close()
        abandoned = next(t for t in first._threads if t.name == "worker")
        abandoned.join(timeout=120)

        second = Service(config)
        second.start()
        try:
            wait_until(lambda: list(tps.iterdir()), 120, "the RTSTRUCT after restart")
            wait_until(lambda: second.ledger.job(job.id).state == JobState.SENT, 30, "job sent")
            time.sleep(3)
            assert second.ledger.job(job.id).attempts == 2
        finally:
            second.shutdown()
    assert len(list(tps.iterdir())) == 1
