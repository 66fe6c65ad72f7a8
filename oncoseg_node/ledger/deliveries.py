"""The deliveries table: one row per (job version, destination), and the job it finishes.

A delivery is ``pending`` until its destination accepted the structure set
(with Storage Commitment: until the commitment report arrived), or failed
for good. When no delivery of a job is pending any more the job is finished
here, in the same transaction: ``sent`` only when every destination said
Success. Every state change is checked against :mod:`oncoseg_node.ledger.states`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from oncoseg_node.errors import LedgerError
from oncoseg_node.ledger.connection import LedgerPart
from oncoseg_node.ledger.jobs import current_job_state, move_job
from oncoseg_node.ledger.states import DeliveryState, JobState, check_delivery_move


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    destination: str
    sop_instance_uid: str
    relpath: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_status: int | None
    reason: str | None
    transaction_uid: str | None
    stored_at: float | None
    delivered_at: float | None

    @property
    def awaiting_commitment(self) -> bool:
        """Stored at the destination, waiting for its Storage Commitment report."""
        return self.stored_at is not None and self.transaction_uid is not None


def delivery_from_row(row: sqlite3.Row) -> Delivery:
    data = dict(row)
    for key in ("created_at", "updated_at"):
        data.pop(key)
    data["state"] = DeliveryState(data["state"])
    return Delivery(**data)


def _move_delivery(db: sqlite3.Connection, delivery_id: int, old: str, new: str,
                   now: float) -> DeliveryState:
    target = check_delivery_move(delivery_id, old, new)
    db.execute("UPDATE deliveries SET state = ?, updated_at = ? WHERE id = ?",
               (target, now, delivery_id))
    return target


# Fixed statements for each filter deliveries() offers.
_SELECT = {
    (False, False): "SELECT * FROM deliveries ORDER BY id",
    (True, False): "SELECT * FROM deliveries WHERE job_id = ? ORDER BY id",
    (False, True): "SELECT * FROM deliveries WHERE state = ? ORDER BY id",
    (True, True): "SELECT * FROM deliveries WHERE job_id = ? AND state = ? ORDER BY id",
}


class DeliveryRecords(LedgerPart):
    """Deliveries: started when a job is written, attempted, retried and resent."""

    def start_deliveries(self, job_id: int, targets: Sequence[tuple[str, str, str]]) -> None:
        """Job written: one pending delivery per (destination, SOP Instance UID, file).

        Pending deliveries of older versions of the same series are
        superseded: the planning system gets the newest structure set only.
        """
        now = self.clock()
        with self.connection.transaction() as db:
            job = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if job is None:
                raise LedgerError(f"no job {job_id}")
            older_pending = db.execute(
                """SELECT id, state FROM deliveries WHERE state = ? AND job_id IN
                   (SELECT id FROM jobs WHERE series_uid = ? AND version < ?)""",
                (DeliveryState.PENDING, job["series_uid"], job["version"])).fetchall()
            for row in older_pending:
                _move_delivery(db, row["id"], row["state"], DeliveryState.SUPERSEDED, now)
                db.execute("UPDATE deliveries SET reason = ? WHERE id = ?",
                           (f"superseded by version {job['version']}", row["id"]))
            older_jobs = db.execute(
                """SELECT id FROM jobs WHERE series_uid = ? AND version < ?
                   AND state IN (?, ?)""",
                (job["series_uid"], job["version"], JobState.DELIVERING, JobState.QUEUED),
            ).fetchall()
            for row in older_jobs:
                move_job(db, row["id"], JobState.SUPERSEDED, now)
            for name, uid, relpath in targets:
                db.execute(
                    """INSERT INTO deliveries (job_id, destination, sop_instance_uid, relpath,
                       state, next_attempt_at, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                    (job_id, name, uid, relpath, DeliveryState.PENDING, now, now, now),
                )
            move_job(db, job_id, JobState.DELIVERING if targets else JobState.SENT, now)

    def deliveries(self, job_id: int | None = None,
                   state: DeliveryState | None = None) -> list[Delivery]:
        args: list[object] = [a for a in (job_id, state) if a is not None]
        sql = _SELECT[(job_id is not None, state is not None)]
        return [delivery_from_row(r) for r in self.connection.query(sql, args)]

    def delivery(self, delivery_id: int) -> Delivery | None:
        rows = self.connection.query("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
        return delivery_from_row(rows[0]) if rows else None

    def record_attempt(self, delivery_id: int, *, state: DeliveryState, status: int | None,
                       reason: str | None, next_attempt_at: float | None = None,
                       commitment: tuple[str, float] | None = None,
                       count_attempt: bool = True) -> None:
        """Store one delivery attempt's outcome; finish the job when all are done.

        ``commitment`` (transaction UID, time stored) marks an object the
        destination stored but has yet to commit to; a failed commitment
        clears it so the next attempt stores the object again. Only a pending
        delivery changes: a commitment report can arrive (and deliver it)
        before the attempt that asked for it is recorded.
        """
        now = self.clock()
        with self.connection.transaction() as db:
            row = db.execute("SELECT state FROM deliveries WHERE id = ?",
                             (delivery_id,)).fetchone()
            if row is None:
                raise LedgerError(f"no delivery {delivery_id}")
            if row["state"] != DeliveryState.PENDING:
                return
            target = _move_delivery(db, delivery_id, row["state"], state, now)
            db.execute(
                """UPDATE deliveries SET attempts = attempts + ?, last_status = ?,
                   reason = ?, next_attempt_at = COALESCE(?, next_attempt_at),
                   delivered_at = CASE WHEN ? THEN ? ELSE delivered_at END,
                   transaction_uid = ?, stored_at = ? WHERE id = ?""",
                (int(count_attempt), status, reason, next_attempt_at,
                 target == DeliveryState.DELIVERED, now,
                 commitment[0] if commitment else None, commitment[1] if commitment else None,
                 delivery_id),
            )
            self._finish_job_if_done(db, delivery_id, reason, now)

    def commitment_report(self, transaction_uid: str, committed: bool, reason: str) -> int | None:
        """Apply a destination's Storage Commitment report; returns the delivery id.

        A success delivers; a failure sends the object again at once (same SOP
        Instance UID), since the destination says it does not hold it.
        """
        now = self.clock()
        with self.connection.transaction() as db:
            row = db.execute(
                "SELECT id, state FROM deliveries WHERE transaction_uid = ? AND state = ?",
                (transaction_uid, DeliveryState.PENDING),
            ).fetchone()
            if row is None:
                return None
            if committed:
                _move_delivery(db, row["id"], row["state"], DeliveryState.DELIVERED, now)
                db.execute("UPDATE deliveries SET delivered_at = ?, reason = ? WHERE id = ?",
                           (now, reason, row["id"]))
            else:
                db.execute(
                    """UPDATE deliveries SET transaction_uid = NULL, stored_at = NULL,
                       next_attempt_at = ?, reason = ?, updated_at = ? WHERE id = ?""",
                    (now, reason, now, row["id"]),
                )
            self._finish_job_if_done(db, row["id"], reason, now)
            return int(row["id"])

    def _finish_job_if_done(self, db: sqlite3.Connection, delivery_id: int, reason: str | None,
                            now: float) -> None:
        (job_id,) = db.execute("SELECT job_id FROM deliveries WHERE id = ?",
                               (delivery_id,)).fetchone()
        states = {r[0] for r in db.execute(
            "SELECT state FROM deliveries WHERE job_id = ?", (job_id,))}
        if DeliveryState.PENDING in states or current_job_state(db, job_id) != JobState.DELIVERING:
            return
        final = JobState.SENT if states == {DeliveryState.DELIVERED} else JobState.FAILED
        if DeliveryState.SUPERSEDED in states:
            final = JobState.SUPERSEDED
        move_job(db, job_id, final, now)
        db.execute("UPDATE jobs SET finished_at = ? WHERE id = ?", (now, job_id))
        if final == JobState.FAILED:
            db.execute("UPDATE jobs SET reason = ? WHERE id = ?", (reason, job_id))

    def retry_deliveries(self, job_id: int, destination: str | None = None) -> int:
        """Put a job's failed (or pending) deliveries back to be tried now."""
        now = self.clock()
        with self.connection.transaction() as db:
            rows = [r for r in db.execute(
                "SELECT id, state, destination FROM deliveries WHERE job_id = ? "
                "AND state IN (?, ?)", (job_id, DeliveryState.FAILED, DeliveryState.PENDING))
                if destination is None or r["destination"] == destination]
            for row in rows:
                _move_delivery(db, row["id"], row["state"], DeliveryState.PENDING, now)
                db.execute("UPDATE deliveries SET next_attempt_at = ? WHERE id = ?",
                           (now, row["id"]))
            if rows:
                move_job(db, job_id, JobState.DELIVERING, now)
                db.execute("UPDATE jobs SET reason = NULL WHERE id = ?", (job_id,))
            return len(rows)

    def resend(self, series_uid: str, destination: str | None = None) -> int | None:
        """Send the newest written structure set of a series again (same SOP Instance UID).

        Returns the job id, or None when the series has no written structure set.
        """
        now = self.clock()
        with self.connection.transaction() as db:
            job = db.execute(
                """SELECT j.id FROM jobs j WHERE j.series_uid = ? AND EXISTS
                   (SELECT 1 FROM deliveries d WHERE d.job_id = j.id)
                   ORDER BY j.version DESC LIMIT 1""",
                (series_uid,),
            ).fetchone()
            if job is None:
                return None
            rows = [r for r in db.execute(
                "SELECT id, state, destination FROM deliveries WHERE job_id = ?", (job["id"],))
                if destination is None or r["destination"] == destination]
            if not rows:
                return None
            for row in rows:
                _move_delivery(db, row["id"], row["state"], DeliveryState.PENDING, now)
                db.execute("""UPDATE deliveries SET next_attempt_at = ?, delivered_at = NULL
                              WHERE id = ?""", (now, row["id"]))
            move_job(db, job["id"], JobState.DELIVERING, now)
            db.execute("UPDATE jobs SET reason = NULL WHERE id = ?", (job["id"],))
            return int(job["id"])
