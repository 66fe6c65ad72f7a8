from __future__ import annotations

import pytest

from oncoseg_node.errors import LedgerError
from oncoseg_node.ledger import DeliveryState, JobState, Ledger


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(ledger: Ledger, uid: str, series: str = "1.2.3") -> None:
    ledger.record_instance(sop_instance_uid=uid, series_uid=series, study_uid="1.2",
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.2", relpath=f"objects/{uid}",
                           sha256="0" * 64, size=1, calling_ae="CT")


def test_ledger_uses_wal_and_full_sync(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    assert ledger.connection.query("PRAGMA journal_mode")[0][0] == "wal"
    assert ledger.connection.query("PRAGMA synchronous")[0][0] == 2  # FULL


def test_series_closes_into_one_job_and_late_instances_make_a_new_version(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    record(ledger, "1")
    record(ledger, "2")
    first = ledger.close_series("1.2.3")
    assert first is not None
    assert ledger.close_series("1.2.3") is None  # already closed
    # more instances while the job is still queued: the same job covers them
    record(ledger, "3")
    assert ledger.close_series("1.2.3") is None
    assert len(ledger.jobs()) == 1
    assert ledger.series_instances("1.2.3") == ["objects/1", "objects/2", "objects/3"]
    job = ledger.claim(max_attempts=3)
    assert job.id == first and job.state == JobState.RUNNING and job.attempts == 1
    # instances after the job started: a new version, never a split series
    record(ledger, "4")
    second = ledger.close_series("1.2.3")
    assert second is not None
    versions = [j.version for j in ledger.jobs_of_series("1.2.3")]
    assert versions == [1, 2]


def test_claim_waits_for_reopened_series(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    ledger.close_series("1.2.3")
    record(ledger, "2")  # reopened: its quiet period runs again
    assert ledger.claim(3) is None
    ledger.close_series("1.2.3")
    assert ledger.claim(3) is not None


def test_crashing_series_is_quarantined_after_max_attempts(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    job_id = ledger.close_series("1.2.3")
    for _ in range(2):
        assert ledger.claim(max_attempts=2) is not None
        # the process dies mid-job; the next start requeues it
        assert ledger.requeue_interrupted() == 1
    assert ledger.claim(max_attempts=2) is None
    job = ledger.job(job_id)
    assert job.state == JobState.QUARANTINED
    assert "after 2 attempts" in job.reason


def test_update_job_refuses_unknown_state(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    job_id = ledger.close_series("1.2.3")
    with pytest.raises(LedgerError):
        ledger.update_job(job_id, state="exploded")


def test_deliveries_decide_the_job_state(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    job_id = ledger.close_series("1.2.3")
    ledger.claim(3)
    ledger.start_deliveries(job_id, [("a", "9.1", "outbox/x"), ("b", "9.1", "outbox/x")])
    assert ledger.job(job_id).state == JobState.DELIVERING
    a, b = ledger.deliveries(job_id=job_id)
    ledger.record_attempt(a.id, state=DeliveryState.DELIVERED, status=0, reason="ok")
    assert ledger.job(job_id).state == JobState.DELIVERING
    ledger.record_attempt(b.id, state=DeliveryState.FAILED, status=0xC000, reason="refused")
    assert ledger.job(job_id).state == JobState.FAILED
    assert ledger.retry_deliveries(job_id) == 1
    assert ledger.job(job_id).state == JobState.DELIVERING
    assert ledger.delivery(b.id).state == DeliveryState.PENDING
    ledger.record_attempt(b.id, state=DeliveryState.DELIVERED, status=0, reason="ok")
    assert ledger.job(job_id).state == JobState.SENT


def test_new_version_supersedes_pending_deliveries(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    v1 = ledger.close_series("1.2.3")
    ledger.claim(3)
    ledger.start_deliveries(v1, [("tps", "9.1", "outbox/v1")])
    record(ledger, "2")
    v2 = ledger.close_series("1.2.3")
    ledger.claim(3)
    ledger.start_deliveries(v2, [("tps", "9.2", "outbox/v2")])
    assert ledger.deliveries(job_id=v1)[0].state == DeliveryState.SUPERSEDED
    assert ledger.job(v1).state == JobState.SUPERSEDED
    assert ledger.deliveries(job_id=v2)[0].state == DeliveryState.PENDING
    assert ledger.job(v2).state == JobState.DELIVERING
    assert JobState.QUEUED not in {j.state for j in ledger.jobs()}


def test_operator_release_and_discard(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    job_id = ledger.close_series("1.2.3")
    ledger.claim(3)
    assert not ledger.release(job_id)  # only held jobs can be released
    ledger.update_job(job_id, state=JobState.HELD, reason="geometry: missing slice")
    assert ledger.release(job_id)
    job = ledger.claim(3)
    assert job.id == job_id and job.override_geometry == 1 and job.attempts == 1
    ledger.update_job(job_id, state=JobState.HELD, reason="again")
    assert ledger.discard(job_id, "discarded by operator: wrong patient")
    assert ledger.job(job_id).state == JobState.DISCARDED
    assert not ledger.release(job_id)


def test_resend_puts_the_newest_structure_set_back_in_delivery(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    assert ledger.resend("1.2.3") is None  # nothing written yet
    job_id = ledger.close_series("1.2.3")
    ledger.claim(3)
    ledger.start_deliveries(job_id, [("tps", "9.1", "outbox/x"), ("pacs", "9.1", "outbox/x")])
    for d in ledger.deliveries(job_id):
        ledger.record_attempt(d.id, state=DeliveryState.DELIVERED, status=0, reason="ok")
    assert ledger.job(job_id).state == JobState.SENT
    assert ledger.resend("1.2.3", "tps") == job_id
    states = {d.destination: d.state for d in ledger.deliveries(job_id)}
    assert states == {"tps": DeliveryState.PENDING, "pacs": DeliveryState.DELIVERED}
    assert ledger.deliveries(job_id)[0].sop_instance_uid == "9.1"
    assert ledger.job(job_id).state == JobState.DELIVERING


def test_commitment_report_delivers_or_sends_again(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    record(ledger, "1")
    job_id = ledger.close_series("1.2.3")
    ledger.claim(3)
    ledger.start_deliveries(job_id, [("tps", "9.1", "outbox/x")])
    (d,) = ledger.deliveries(job_id)
    ledger.record_attempt(d.id, state=DeliveryState.PENDING, status=0,
                          reason="stored; awaiting commitment",
                          next_attempt_at=clock.now + 60, commitment=("7.7", clock.now))
    assert ledger.delivery(d.id).awaiting_commitment
    assert ledger.commitment_report("unknown", True, "x") is None
    clock.now += 5
    assert ledger.commitment_report("7.7", False, "destination did not commit") == d.id
    again = ledger.delivery(d.id)
    assert not again.awaiting_commitment and again.next_attempt_at == clock.now
    assert again.state == DeliveryState.PENDING
    ledger.record_attempt(d.id, state=DeliveryState.PENDING, status=0, reason="stored",
                          next_attempt_at=clock.now + 60, commitment=("7.8", clock.now))
    assert ledger.commitment_report("7.8", True, "committed by destination") == d.id
    assert ledger.delivery(d.id).state == DeliveryState.DELIVERED
    assert ledger.job(job_id).state == JobState.SENT


def test_deferred_job_lets_newer_series_go_first(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    record(ledger, "1", series="1.1")
    crashing = ledger.close_series("1.1")
    record(ledger, "2", series="1.2")
    newer = ledger.close_series("1.2")
    assert ledger.claim(3).id == crashing
    assert ledger.defer_job(crashing, "OSError: disk full", delay_s=60, max_attempts=3) \
        == JobState.QUEUED
    job = ledger.job(crashing)
    assert job.state == JobState.QUEUED and job.not_before == clock.now + 60
    assert job.reason == "OSError: disk full"
    assert ledger.claim(3).id == newer  # not blocked behind the deferred job
    assert ledger.claim(3) is None  # still in its backoff
    clock.now += 60
    assert ledger.claim(3).id == crashing


def test_deferral_after_the_last_attempt_quarantines(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    job_id = ledger.close_series("1.2.3")
    ledger.claim(max_attempts=2)
    assert ledger.defer_job(job_id, "OSError: x", delay_s=1, max_attempts=2) == JobState.QUEUED
    with ledger.transaction() as db:  # let the backoff pass
        db.execute("UPDATE jobs SET not_before = 0 WHERE id = ?", (job_id,))
    ledger.claim(max_attempts=2)
    assert ledger.defer_job(job_id, "OSError: x", delay_s=1, max_attempts=2) \
        == JobState.QUARANTINED
    job = ledger.job(job_id)
    assert job.state == JobState.QUARANTINED
    assert job.reason == "quarantined after 2 attempts: OSError: x"


def test_interrupted_job_goes_behind_the_series_already_waiting(tmp_path):
    clock = Clock()
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    record(ledger, "1", series="1.1")
    interrupted = ledger.close_series("1.1")
    ledger.claim(3)
    clock.now += 1
    record(ledger, "2", series="1.2")
    waiting = ledger.close_series("1.2")
    clock.now += 1
    assert ledger.requeue_interrupted() == 1  # the node restarts
    assert ledger.claim(3).id == waiting
    assert ledger.claim(3).id == interrupted  # no backoff: it runs as soon as the queue is free


def test_status_says_when_a_deferred_job_runs_again(tmp_path):
    from oncoseg_node.intake.spool import Spool
    from oncoseg_node.ops.status import iso, job_rows, render_text

    clock = Clock()
    ledger = Ledger(tmp_path / "l.db", clock=clock)
    record(ledger, "1")
    job_id = ledger.close_series("1.2.3")
    ledger.claim(3)
    ledger.defer_job(job_id, "OSError: disk full", delay_s=120, max_attempts=3)
    (row,) = job_rows(ledger, Spool(tmp_path / "spool"), 10)
    assert row["state"] == JobState.QUEUED and row["retry_after"] == iso(clock.now + 120)
    assert f"next attempt after {iso(clock.now + 120)}" in render_text([row])
