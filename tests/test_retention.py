"""Retention: old finished series leave the spool; anything unfinished stays, however old."""

from __future__ import annotations

import os
import time

import pytest

from oncoseg_node.config import RetentionConfig
from oncoseg_node.intake.spool import Spool
from oncoseg_node.ledger import DeliveryState, JobState, Ledger
from oncoseg_node.ops.retention import DAY_S, Retention
from tests.daemon import wait_until

START = 1_700_000_000.0
MAX_AGE_DAYS = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def node(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "ledger.sqlite3", clock=clock)
    spool = Spool(tmp_path / "spool")
    retention = Retention(RetentionConfig(max_age_days=MAX_AGE_DAYS, check_interval_s=3600),
                          ledger, spool, clock=clock)
    yield clock, ledger, spool, retention
    retention.stop()
    ledger.close()


def receive(ledger: Ledger, spool: Spool, series_uid: str, count: int = 3,
            first: int = 0) -> list[str]:
    relpaths = []
    for i in range(first, first + count):
        stored = spool.store(f"{series_uid}-{i}".encode())
        ledger.record_instance(sop_instance_uid=f"{series_uid}.{i}", series_uid=series_uid,
                               study_uid="1.2", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                               relpath=stored.relpath, sha256=stored.sha256, size=stored.size,
                               calling_ae="CTSIM")
        relpaths.append(stored.relpath)
    return relpaths


def job_for(ledger: Ledger, series_uid: str, *, outcome: str) -> int:
    """Close the series into a job and take it to ``outcome``."""
    job_id = ledger.close_series(series_uid)
    assert job_id is not None
    ledger.claim(max_attempts=3)
    if outcome in (JobState.HELD, JobState.FAILED, JobState.QUARANTINED, JobState.SKIPPED):
        ledger.update_job(job_id, state=outcome, reason="test")
        return job_id
    ledger.start_deliveries(job_id, [("tps", f"{series_uid}.rs", f"outbox/job{job_id}.dcm")])
    if outcome in (JobState.SENT, "delivery_failed"):
        (delivery,) = ledger.deliveries(job_id=job_id)
        ledger.record_attempt(delivery.id, state=DeliveryState.DELIVERED if outcome == JobState.SENT
                              else DeliveryState.FAILED,
                              status=0, reason="test")
    return job_id


def files_exist(spool: Spool, relpaths: list[str]) -> list[bool]:
    return [spool.path(r).exists() for r in relpaths]


def test_old_delivered_series_is_purged_and_its_job_kept(node):
    clock, ledger, spool, retention = node
    relpaths = receive(ledger, spool, "1.1")
    job_id = job_for(ledger, "1.1", outcome=JobState.SENT)
    clock.now += MAX_AGE_DAYS * DAY_S + 60
    report = retention.purge()
    assert report.series == ["1.1"] and report.instances == 3
    assert files_exist(spool, relpaths) == [False] * 3
    assert ledger.series_instances("1.1") == []
    assert ledger.job(job_id).state == JobState.SENT  # the record of what was sent stays
    assert retention.purge().series == []


@pytest.mark.parametrize("outcome", [JobState.DELIVERING, "delivery_failed", JobState.HELD,
                                     JobState.FAILED, JobState.QUARANTINED])
def test_unfinished_delivery_is_never_purged(node, outcome):
    clock, ledger, spool, retention = node
    relpaths = receive(ledger, spool, "1.2")
    job_for(ledger, "1.2", outcome=outcome)
    clock.now += 10 * MAX_AGE_DAYS * DAY_S
    assert retention.purge().series == []
    assert files_exist(spool, relpaths) == [True] * 3
    assert len(ledger.series_instances("1.2")) == 3


def test_series_still_in_its_quiet_period_or_queued_is_kept(node):
    clock, ledger, spool, retention = node
    open_series = receive(ledger, spool, "1.3")  # never closed: no job yet
    queued = receive(ledger, spool, "1.4")
    ledger.close_series("1.4")
    clock.now += 10 * MAX_AGE_DAYS * DAY_S
    assert retention.purge().series == []
    assert all(files_exist(spool, open_series + queued))


def test_age_counts_from_the_last_activity_of_the_series(node):
    clock, ledger, spool, retention = node
    relpaths = receive(ledger, spool, "1.5")
    clock.now += 20 * DAY_S
    job_for(ledger, "1.5", outcome=JobState.SENT)  # delivered 20 days after the last instance
    clock.now += 15 * DAY_S
    assert retention.purge().series == []  # 35 days after receipt, 15 after delivery
    clock.now += 16 * DAY_S
    assert retention.purge().series == ["1.5"]
    assert not any(files_exist(spool, relpaths))


def test_a_newer_version_in_flight_keeps_the_older_delivered_one(node):
    clock, ledger, spool, retention = node
    receive(ledger, spool, "1.6")
    job_for(ledger, "1.6", outcome=JobState.SENT)
    clock.now += MAX_AGE_DAYS * DAY_S + 60
    receive(ledger, spool, "1.6", count=1, first=3)  # a late instance, a month later
    ledger.close_series("1.6")  # version 2 queued
    clock.now += MAX_AGE_DAYS * DAY_S + 60
    assert retention.purge().series == []
    assert len(ledger.series_instances("1.6")) == 4


def test_superseded_and_skipped_versions_count_as_finished(node):
    clock, ledger, spool, retention = node
    receive(ledger, spool, "1.7")
    first = job_for(ledger, "1.7", outcome=JobState.DELIVERING)
    receive(ledger, spool, "1.7", count=1, first=3)
    job_for(ledger, "1.7", outcome=JobState.SENT)  # version 2 supersedes version 1's delivery
    assert ledger.job(first).state == JobState.SUPERSEDED
    receive(ledger, spool, "1.8")
    job_for(ledger, "1.8", outcome=JobState.SKIPPED)
    clock.now += MAX_AGE_DAYS * DAY_S + 60
    assert sorted(retention.purge().series) == ["1.7", "1.8"]


def test_a_series_reopened_after_the_query_is_kept(node):
    clock, ledger, spool, retention = node
    receive(ledger, spool, "1.9")
    job_for(ledger, "1.9", outcome=JobState.SENT)
    clock.now += MAX_AGE_DAYS * DAY_S + 60
    cutoff = clock.now - MAX_AGE_DAYS * DAY_S
    assert ledger.purgeable_series(cutoff) == ["1.9"]
    receive(ledger, spool, "1.9", count=1, first=3)  # a late instance reopens the series
    assert ledger.purge_series("1.9", cutoff) is None
    assert len(ledger.series_instances("1.9")) == 4


def test_files_without_a_row_are_never_deleted_however_old(node):
    """The ledger may have been lost: a missing row is no proof a file is finished."""
    clock, ledger, spool, retention = node
    referenced = receive(ledger, spool, "2.1", count=1)
    unknown = spool.store(b"acknowledged, then the ledger was lost").relpath
    real_now = time.time()
    for relpath in (unknown, referenced[0]):
        os.utime(spool.path(relpath), (real_now - 100 * DAY_S,) * 2)
    clock.now = real_now + 100 * DAY_S
    retention.purge()
    assert files_exist(spool, [unknown, referenced[0]]) == [True, True]


def test_a_purge_interrupted_between_files_and_rows_is_finished_next_pass(node):
    clock, ledger, spool, retention = node
    relpaths = receive(ledger, spool, "2.2")
    job_for(ledger, "2.2", outcome=JobState.SENT)
    clock.now += MAX_AGE_DAYS * DAY_S + 60
    cutoff = clock.now - MAX_AGE_DAYS * DAY_S
    marked = ledger.purge_series("2.2", cutoff)  # the node dies right after this
    assert sorted(marked) == sorted(relpaths)
    spool.remove(relpaths[0])  # ... and after deleting one file
    assert ledger.known_relpaths() == set(relpaths)  # every file still has its row
    assert ledger.purging_series() == ["2.2"]
    report = retention.purge()
    assert report.series == ["2.2"] and not any(files_exist(spool, relpaths))
    assert ledger.known_relpaths() == set() and ledger.purging_series() == []


def test_scheduler_runs_a_first_pass_at_start(node):
    clock, ledger, spool, retention = node
    relpaths = receive(ledger, spool, "3.1")
    job_for(ledger, "3.1", outcome=JobState.SENT)
    clock.now += MAX_AGE_DAYS * DAY_S + 60
    retention.start()
    wait_until(lambda: not any(files_exist(spool, relpaths)), 10, "the first retention pass")
    retention.stop()
    assert not retention.scheduler.running
