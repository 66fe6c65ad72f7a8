"""Job failures through the real daemon: a failing series never holds up the newer ones.

A series that crashes the engine fails at its first attempt with the reason;
one whose failure can pass later (here the outbox file cannot be written) is
deferred with backoff while the newer series is contoured and delivered, and
quarantined after ``series.max_attempts``.
"""

from __future__ import annotations

import pytest
from pydicom.uid import generate_uid

from oncoseg_node.ledger import JobState, Ledger
from tests.conftest import write_config
from tests.ctfactory import ct_slice, encode, series
from tests.daemon import Daemon, wait_until
from tests.peers import storescp, storescu

pytestmark = pytest.mark.peers


def write(datasets, directory):
    directory.mkdir(parents=True, exist_ok=True)
    for ds in datasets:
        (directory / f"{ds.SeriesInstanceUID[-8:]}_{ds.InstanceNumber:04d}.dcm").write_bytes(
            encode(ds))
    return directory


def zero_spacing_series(n: int = 4):
    """A CT series whose PixelSpacing is 0\\0: it loads, and the engine divides by it."""
    uids = dict(series_uid=generate_uid(), study_uid=generate_uid(), frame_uid=generate_uid())
    slices = [ct_slice(index=i, **uids) for i in range(n)]
    for ds in slices:
        ds.PixelSpacing = [0, 0]
    return slices


def start(tmp_path, tps_port: int, **series_cfg) -> Daemon:
    config = write_config(
        tmp_path, series={"quiet_period_s": 1, **series_cfg},
        destinations=[{"name": "tps", "ae_title": "TPS", "host": "127.0.0.1",
                       "port": tps_port, "timeout_s": 5}])
    return Daemon(config, 0, tmp_path / "daemon.log").start()


def job_of(ledger: Ledger, series_uid: str):
    (job,) = ledger.jobs_of_series(series_uid)
    return job


def test_a_series_that_crashes_the_engine_delays_a_newer_one_by_one_attempt_at_most(tmp_path):
    bad, good = zero_spacing_series(), series(6)
    write(bad, tmp_path / "bad")
    write(good, tmp_path / "good")
    with storescp(tmp_path / "tps") as tps_port:
        daemon = start(tmp_path, tps_port, max_attempts=3)
        try:
            for folder in ("bad", "good"):  # the crashing series first, the newer one after
                assert storescu(tmp_path / folder, daemon.port).returncode == 0
            ledger = Ledger(tmp_path / "state" / "ledger.sqlite3")
            wait_until(lambda: ledger.jobs_of_series(good[0].SeriesInstanceUID)
                       and job_of(ledger, good[0].SeriesInstanceUID).state == JobState.SENT,
                       90, f"the newer series sent\n{daemon.log()}")
            crashed = job_of(ledger, bad[0].SeriesInstanceUID)
            sent = job_of(ledger, good[0].SeriesInstanceUID)
        finally:
            daemon.stop()
    assert crashed.id < sent.id  # it was ahead in the queue
    assert crashed.attempts == 1, crashed
    assert crashed.state == JobState.FAILED
    assert "ZeroDivisionError" in crashed.reason and crashed.reason.startswith("engine: ")
    assert sent.attempts == 1


def test_a_retryable_failure_is_deferred_while_the_newer_series_goes_first(tmp_path):
    blocked, good = series(4), series(6)
    write(blocked, tmp_path / "blocked")
    write(good, tmp_path / "good")
    # The first job's structure set cannot be written: its outbox name is taken
    # by a folder, an OSError like a full or read-only disk would give.
    (tmp_path / "state" / "outbox" / "job1-v1-generic.dcm").mkdir(parents=True)
    with storescp(tmp_path / "tps") as tps_port:
        daemon = start(tmp_path, tps_port, max_attempts=2, retry_delay_s=4)
        try:
            for folder in ("blocked", "good"):  # job 1 is the blocked series
                assert storescu(tmp_path / folder, daemon.port).returncode == 0
            ledger = Ledger(tmp_path / "state" / "ledger.sqlite3")
            first = wait_until(
                lambda: [j for j in ledger.jobs_of_series(blocked[0].SeriesInstanceUID)
                         if j.reason], 60, f"the first attempt to fail\n{daemon.log()}")[0]
            assert first.id == 1 and first.state in (JobState.QUEUED, JobState.QUARANTINED)
            wait_until(lambda: ledger.jobs_of_series(good[0].SeriesInstanceUID)
                       and job_of(ledger, good[0].SeriesInstanceUID).state == JobState.SENT,
                       60, f"the newer series sent\n{daemon.log()}")
            newer = job_of(ledger, good[0].SeriesInstanceUID)
            final = wait_until(
                lambda: (j := job_of(ledger, blocked[0].SeriesInstanceUID)).state
                == JobState.QUARANTINED and j, 60, f"quarantine\n{daemon.log()}")
        finally:
            daemon.stop()
    assert first.not_before is not None and first.reason.startswith("IsADirectoryError")
    assert final.attempts == 2
    # the newer series was contoured before the blocked one's second attempt
    assert newer.started_at < final.started_at and newer.attempts == 1
    assert final.reason.startswith("quarantined after 2 attempts: IsADirectoryError")
