"""Intake through the real daemon process: completeness decisions, restarts and kill -9."""

from __future__ import annotations

import random
import threading
import time

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from oncoseg_node.config import load_config
from oncoseg_node.intake.spool import TMP_SUFFIX, Spool
from oncoseg_node.ledger import JobState, Ledger
from tests.conftest import write_config
from tests.ctfactory import ct_slice, encode, series
from tests.daemon import Daemon, wait_until
from tests.peers import storescu

pytestmark = pytest.mark.peers


def start_daemon(tmp_path, quiet: float = 2.0) -> Daemon:
    config = write_config(tmp_path, series={"quiet_period_s": quiet})
    return Daemon(config, 0, tmp_path / "daemon.log").start()


def write(datasets, directory):
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = directory / f"{ds.SeriesInstanceUID[-6:]}_{ds.InstanceNumber:04d}.dcm"
        path.write_bytes(encode(ds))
        paths.append(path)
    return paths


def jobs_for(daemon: Daemon, series_uid: str) -> list[dict]:
    return [j for j in daemon.status() if j["series_uid"] == series_uid]


def settled(daemon: Daemon, series_uid: str, count: int = 1):
    def done():
        jobs = jobs_for(daemon, series_uid)
        waiting = (JobState.QUEUED, JobState.RUNNING)
        if len(jobs) >= count and all(j["state"] not in waiting for j in jobs):
            return jobs
        return None
    return done


def test_restart_during_quiet_period_gives_exactly_one_job(tmp_path):
    daemon = start_daemon(tmp_path, quiet=3.0)
    datasets = series(8)
    assert storescu(write(datasets, tmp_path / "send"), daemon.port).returncode == 0
    daemon.kill()  # kill -9 inside the quiet period
    daemon.start()
    try:
        uid = str(datasets[0].SeriesInstanceUID)
        jobs = wait_until(settled(daemon, uid), 60, "the job after restart")
        time.sleep(4)  # a second job would have appeared by now
        assert len(jobs_for(daemon, uid)) == 1
    finally:
        daemon.stop()
    assert len(jobs) == 1


def test_one_series_over_several_associations_gives_one_job(tmp_path):
    daemon = start_daemon(tmp_path, quiet=3.0)
    try:
        datasets = series(9)
        files = write(datasets, tmp_path / "send")
        for chunk in (files[:3], files[3:6], files[6:]):
            assert storescu(chunk, daemon.port).returncode == 0
            time.sleep(0.5)
        uid = str(datasets[0].SeriesInstanceUID)
        wait_until(settled(daemon, uid), 60, "one job")
        time.sleep(3.5)
        assert len(jobs_for(daemon, uid)) == 1
    finally:
        daemon.stop()


def test_interleaved_series_give_two_jobs(tmp_path):
    daemon = start_daemon(tmp_path)
    try:
        a, b = series(6), series(6)
        files = write([ds for pair in zip(a, b, strict=True) for ds in pair], tmp_path / "s")
        assert storescu(files, daemon.port).returncode == 0
        for datasets in (a, b):
            uid = str(datasets[0].SeriesInstanceUID)
            jobs = wait_until(settled(daemon, uid), 60, "a job per series")
            assert len(jobs) == 1
    finally:
        daemon.stop()


def test_late_instances_make_a_new_version_not_a_split_series(tmp_path):
    daemon = start_daemon(tmp_path, quiet=1.5)
    try:
        datasets = series(8)
        files = write(datasets, tmp_path / "send")
        uid = str(datasets[0].SeriesInstanceUID)
        assert storescu(files[:-1], daemon.port).returncode == 0
        wait_until(settled(daemon, uid), 60, "first version")
        assert storescu(files[-1:], daemon.port).returncode == 0
        jobs = wait_until(settled(daemon, uid, count=2), 60, "second version")
        assert sorted(j["version"] for j in jobs) == [1, 2]
    finally:
        daemon.stop()


def test_missing_slice_holds_the_job_with_its_reason(tmp_path):
    daemon = start_daemon(tmp_path)
    try:
        datasets = series(10)
        del datasets[4]
        assert storescu(write(datasets, tmp_path / "send"), daemon.port).returncode == 0
        uid = str(datasets[0].SeriesInstanceUID)
        (job,) = wait_until(settled(daemon, uid), 60, "held job")
        assert job["state"] == JobState.HELD
        assert "missing slice" in job["reason"]
        text = daemon.cli("status")
        assert "held" in text.stdout and "missing slice" in text.stdout
    finally:
        daemon.stop()


class Sender(threading.Thread):
    """Sends instances one by one; remembers which got Success."""

    def __init__(self, port: int, datasets) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.datasets = datasets
        self.acknowledged: list[pydicom.Dataset] = []

    def run(self) -> None:
        ae = AE(ae_title="CTSIM")
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        assoc = ae.associate("127.0.0.1", self.port, ae_title="ONCOSEG")
        if not assoc.is_established:
            return
        for ds in self.datasets:
            response = assoc.send_c_store(ds)
            if getattr(response, "Status", None) != 0x0000:
                break
            self.acknowledged.append(ds)
        if assoc.is_established:
            assoc.release()


def test_kill_9_while_receiving_loses_nothing_acknowledged(tmp_path):
    rng = random.Random(1234)
    for run in range(3):
        run_dir = tmp_path / f"run{run}"
        run_dir.mkdir()
        daemon = start_daemon(run_dir, quiet=1.0)
        cfg = load_config(daemon.config_path)
        study, series_uid, frame = "1.2.3.4", f"1.2.3.4.{run}", "1.2.3.5"
        datasets = [ct_slice(series_uid=series_uid, study_uid=study, frame_uid=frame, index=i,
                             size=64) for i in range(200)]
        sender = Sender(daemon.port, datasets)
        sender.start()
        # the kill lands after the first acknowledgement, at a random point after it:
        # a fixed delay from the start missed the series altogether on a loaded machine
        wait_until(lambda s=sender: s.acknowledged, 60, "a first acknowledged instance",
                   interval=0.01)
        time.sleep(rng.uniform(0.0, 0.8))
        daemon.kill()
        sender.join(timeout=30)
        acknowledged = list(sender.acknowledged)
        assert 0 < len(acknowledged) < 200, "the kill should land mid-series"
        # whatever is visible under an instance name is a complete instance
        spool = Spool(cfg.spool_dir)
        for path in spool.objects.rglob("*.dcm"):
            assert len(pydicom.dcmread(path).PixelData) == 64 * 64 * 2
        daemon.start()
        try:
            assert not list(spool.objects.rglob(f"*{TMP_SUFFIX}"))
            ledger = Ledger(cfg.ledger_path)
            stored = {}
            for relpath in ledger.series_instances(series_uid):
                ds = pydicom.dcmread(spool.path(relpath))
                stored[ds.SOPInstanceUID] = ds
            for ds in acknowledged:
                assert ds.SOPInstanceUID in stored
                assert stored[ds.SOPInstanceUID] == ds
                assert stored[ds.SOPInstanceUID].PixelData == ds.PixelData
            # cut off by the node's own death: interrupted, so no job from the
            # part that arrived, however long past the quiet period
            time.sleep(3)
            assert jobs_for(daemon, series_uid) == []
            assert "series_interrupted_by_node_stop" in daemon.log()
            resend = Sender(daemon.port, [ds for ds in datasets if ds not in acknowledged])
            resend.run()
            assert len(resend.acknowledged) == 200 - len(acknowledged)
            (job,) = wait_until(settled(daemon, series_uid), 60, "one job")
            time.sleep(2)
            assert len(jobs_for(daemon, series_uid)) == 1
            assert len(ledger.series_instances(series_uid)) == 200
            ledger.close()
        finally:
            daemon.stop()
