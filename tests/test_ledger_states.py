"""Job and delivery states: one table of allowed moves, enforced on every update."""

from __future__ import annotations

import sqlite3

import pytest

from oncoseg_node.errors import LedgerError
from oncoseg_node.ledger import DeliveryState, JobState, Ledger
from oncoseg_node.ledger.migrations import LATEST_VERSION, MIGRATIONS
from oncoseg_node.ledger.states import DELIVERY_MOVES, JOB_MOVES


def record(ledger: Ledger, uid: str, series: str = "1.2.3") -> None:
    ledger.record_instance(sop_instance_uid=uid, series_uid=series, study_uid="1.2",
                           sop_class_uid="1.2.840.10008.5.1.4.1.1.2", relpath=f"objects/{uid}",
                           sha256="0" * 64, size=1, calling_ae="CT")


def test_every_state_has_its_moves_listed():
    assert set(JOB_MOVES) == set(JobState)
    assert set(DELIVERY_MOVES) == set(DeliveryState)
    assert JOB_MOVES[JobState.DISCARDED] == frozenset()


def test_states_compare_equal_to_the_stored_strings():
    assert JobState.SENT == "sent" and f"{DeliveryState.PENDING}" == "pending"


def test_illegal_job_move_raises_and_changes_nothing(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    job_id = ledger.close_series("1.2.3")
    with pytest.raises(LedgerError, match="cannot go from queued to sent"):
        ledger.update_job(job_id, state=JobState.SENT, reason="never written")
    job = ledger.job(job_id)
    assert job.state == JobState.QUEUED and job.reason is None


def test_update_job_refuses_a_column_it_does_not_know(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    job_id = ledger.close_series("1.2.3")
    with pytest.raises(LedgerError, match="cannot be updated"):
        ledger.update_job(job_id, **{"attempts = 0, state": "queued"})
    with pytest.raises(LedgerError, match="cannot be updated"):
        ledger.update_job(job_id, attempts=0)


def test_a_discarded_job_cannot_be_resent(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    job_id = ledger.close_series("1.2.3")
    ledger.claim(3)
    ledger.start_deliveries(job_id, [("tps", "9.1", "outbox/x")])
    (d,) = ledger.deliveries(job_id)
    ledger.record_attempt(d.id, state=DeliveryState.FAILED, status=None, reason="refused")
    assert ledger.discard(job_id, "wrong patient")
    with pytest.raises(LedgerError, match="cannot go from discarded to delivering"):
        ledger.resend("1.2.3")
    assert ledger.delivery(d.id).state == DeliveryState.FAILED  # rolled back


def test_record_attempt_refuses_a_job_state_as_delivery_state(tmp_path):
    ledger = Ledger(tmp_path / "l.db")
    record(ledger, "1")
    job_id = ledger.close_series("1.2.3")
    ledger.claim(3)
    ledger.start_deliveries(job_id, [("tps", "9.1", "outbox/x")])
    (d,) = ledger.deliveries(job_id)
    with pytest.raises(LedgerError, match="unknown delivery state 'sent'"):
        ledger.record_attempt(d.id, state="sent", status=0, reason="ok")  # type: ignore[arg-type]


def test_migrations_are_numbered_in_order_and_recorded(tmp_path):
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    Ledger(tmp_path / "l.db").close()
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION


def test_a_ledger_from_a_newer_release_is_refused(tmp_path):
    path = tmp_path / "l.db"
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    with pytest.raises(LedgerError, match="newer than this release"):
        Ledger(path)
