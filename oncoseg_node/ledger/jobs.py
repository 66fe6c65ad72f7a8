"""The jobs table: one contouring job per (series, version), claimed by the worker.

Claiming moves the attempt counter in the same transaction, so a series
that crashes the worker is quarantined after ``max_attempts`` rather than
crashing it forever. Claims go in order of the time a job became ready: its
creation, or for a deferred or interrupted job the end of its wait
(``not_before``), so a series that keeps failing never runs ahead of the
series that arrived meanwhile. Every state change is checked against
:mod:`oncoseg_node.ledger.states` inside the transaction that makes it.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from oncoseg_node.errors import LedgerError
from oncoseg_node.ledger.connection import LedgerPart
from oncoseg_node.ledger.states import (
    JOB_DISCARDABLE,
    JOB_FINISHED,
    JobState,
    SeriesState,
    check_job_move,
)


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    version: int
    state: JobState
    attempts: int
    reason: str | None
    calling_ae: str | None
    protocol: str | None
    protocol_version: str | None
    rtstruct_relpath: str | None
    rtstruct_uid: str | None
    results: list[dict[str, Any]] | None
    override_geometry: int
    created_at: float
    updated_at: float
    started_at: float | None
    finished_at: float | None
    not_before: float | None  # a deferred job is not claimed before this time
    stage_seconds: dict[str, float] | None = None  # load, segment, write: seconds each
    override_finding: str | None = None  # the geometry finding an operator released it despite


def job_from_row(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["state"] = JobState(data["state"])
    data["results"] = json.loads(data["results"]) if data["results"] else None
    data["stage_seconds"] = (json.loads(data["stage_seconds"]) if data.get("stage_seconds")
                             else None)
    return Job(**data)


# The columns update_job may set, each with its own fixed assignment: no
# caller-supplied name ever reaches the SQL text.
_UPDATABLE = {
    "reason": "reason = ?",
    "protocol": "protocol = ?",
    "protocol_version": "protocol_version = ?",
    "rtstruct_relpath": "rtstruct_relpath = ?",
    "rtstruct_uid": "rtstruct_uid = ?",
    "results": "results = ?",
    "finished_at": "finished_at = ?",
    "stage_seconds": "stage_seconds = ?",
    "override_finding": "override_finding = ?",
}


def current_job_state(db: sqlite3.Connection, job_id: int) -> JobState:
    row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise LedgerError(f"no job {job_id}")
    return JobState(row[0])


def move_job(db: sqlite3.Connection, job_id: int, new: str, now: float) -> None:
    """Set a job's state after checking the move; stamps ``finished_at`` on a final state."""
    target = check_job_move(job_id, current_job_state(db, job_id), new)
    if target in JOB_FINISHED:
        db.execute("UPDATE jobs SET state = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                   (target, now, now, job_id))
    else:
        db.execute("UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?",
                   (target, now, job_id))


# The reason of a job held because its series' counts say slices are missing.
INCOMPLETE_PREFIX = "incomplete: "


class JobRecords(LedgerPart):
    """Jobs: created from closed series, claimed, finished, released or discarded."""

    def close_series(self, series_uid: str, held_reason: str | None = None) -> int | None:
        """Close a complete series into a job; returns the new job id, or None.

        A job that is still queued simply covers the new instances (it reads
        the series when it runs). Otherwise a new version is created: the
        series is never split into two jobs. ``held_reason`` creates the job
        held (a series whose counts say slices are missing: never contoured
        as if whole until an operator releases it). A new version supersedes
        older versions still held: the instances they lacked have arrived.
        """
        now = self.clock()
        with self.connection.transaction() as db:
            row = db.execute(
                "SELECT * FROM series WHERE series_uid = ? AND state = ?",
                (series_uid, SeriesState.OPEN),
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE series SET state = ? WHERE series_uid = ?",
                       (SeriesState.CLOSED, series_uid))
            queued = db.execute(
                "SELECT id FROM jobs WHERE series_uid = ? AND state = ?",
                (series_uid, JobState.QUEUED),
            ).fetchone()
            if queued is not None:
                return None
            (version,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM jobs WHERE series_uid = ?",
                (series_uid,),
            ).fetchone()
            held = [r[0] for r in db.execute(
                "SELECT id FROM jobs WHERE series_uid = ? AND state = ?",
                (series_uid, JobState.HELD))]
            for job_id in held:
                move_job(db, job_id, JobState.SUPERSEDED, now)
            state = JobState.QUEUED if held_reason is None else JobState.HELD
            cursor = db.execute(
                """INSERT INTO jobs (series_uid, version, state, reason, calling_ae, created_at,
                   updated_at, finished_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (series_uid, version, state, held_reason, row["calling_ae"], now, now,
                 None if held_reason is None else now),
            )
            assert cursor.lastrowid is not None  # set by every successful INSERT
            return cursor.lastrowid

    def claim(self, max_attempts: int) -> Job | None:
        """Take the oldest queued job whose series is quiet; attempts += 1 atomically."""
        now = self.clock()
        with self.connection.transaction() as db:
            while True:
                row = db.execute(
                    """SELECT j.* FROM jobs j JOIN series s ON s.series_uid = j.series_uid
                       WHERE j.state = ? AND s.state = ?
                       AND (j.not_before IS NULL OR j.not_before <= ?)
                       ORDER BY COALESCE(j.not_before, j.created_at), j.id LIMIT 1""",
                    (JobState.QUEUED, SeriesState.CLOSED, now),
                ).fetchone()
                if row is None:
                    return None
                if row["attempts"] >= max_attempts:
                    move_job(db, row["id"], JobState.QUARANTINED, now)
                    db.execute("UPDATE jobs SET reason = ? WHERE id = ?",
                               (f"quarantined after {row['attempts']} attempts: "
                                f"{row['reason'] or 'worker stopped during the job'}",
                                row["id"]))
                    continue
                move_job(db, row["id"], JobState.RUNNING, now)
                db.execute("UPDATE jobs SET attempts = attempts + 1, started_at = ? WHERE id = ?",
                           (now, row["id"]))
                return job_from_row(
                    db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def requeue_interrupted(self) -> int:
        """At start: jobs left running by a crash go back to the queue.

        Behind the series already waiting (ready from now on): if the job
        itself crashed the node, the patients queued behind it go first.
        """
        now = self.clock()
        with self.connection.transaction() as db:
            running = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state = ?",
                                                (JobState.RUNNING,))]
            for job_id in running:
                move_job(db, job_id, JobState.QUEUED, now)
                db.execute("UPDATE jobs SET not_before = ? WHERE id = ?", (now, job_id))
            return len(running)

    def defer_job(self, job_id: int, reason: str, *, delay_s: float,
                  max_attempts: int) -> JobState:
        """A running job failed in a way a later attempt can pass: wait ``delay_s``.

        Newer series are claimed meanwhile. After ``max_attempts`` attempts
        the job is quarantined at once instead. Returns the job's new state.
        """
        now = self.clock()
        with self.connection.transaction() as db:
            row = db.execute("SELECT attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise LedgerError(f"no job {job_id}")
            if row["attempts"] >= max_attempts:
                move_job(db, job_id, JobState.QUARANTINED, now)
                db.execute("UPDATE jobs SET reason = ? WHERE id = ?",
                           (f"quarantined after {row['attempts']} attempts: {reason}", job_id))
                return JobState.QUARANTINED
            move_job(db, job_id, JobState.QUEUED, now)
            db.execute("UPDATE jobs SET reason = ?, not_before = ? WHERE id = ?",
                       (reason, now + delay_s, job_id))
            return JobState.QUEUED

    def update_job(self, job_id: int, *, state: str | None = None, **fields: Any) -> None:
        """Set a job's state (checked against the allowed moves) and named columns.

        Only the columns in ``_UPDATABLE`` can be set; any other name is a
        LedgerError, as is an unknown state or a move the states table forbids.
        """
        unknown = sorted(set(fields) - set(_UPDATABLE))
        if unknown:
            raise LedgerError(f"job columns {unknown} cannot be updated")
        for name in ("results", "stage_seconds"):
            if fields.get(name) is not None:
                fields[name] = json.dumps(fields[name])
        now = self.clock()
        with self.connection.transaction() as db:
            if state is not None:
                move_job(db, job_id, state, now)
            for name, value in fields.items():
                db.execute(f"UPDATE jobs SET {_UPDATABLE[name]}, updated_at = ? WHERE id = ?",
                           (value, now, job_id))

    def job(self, job_id: int) -> Job | None:
        rows = self.connection.query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return job_from_row(rows[0]) if rows else None

    def jobs(self, limit: int = 100) -> list[Job]:
        rows = self.connection.query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
        return [job_from_row(r) for r in rows]

    def jobs_of_series(self, series_uid: str) -> list[Job]:
        rows = self.connection.query(
            "SELECT * FROM jobs WHERE series_uid = ? ORDER BY version", (series_uid,))
        return [job_from_row(r) for r in rows]

    def count_jobs_by_state(self) -> dict[str, int]:
        rows = self.connection.query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    # -- operator decisions ---------------------------------------------------

    def release(self, job_id: int) -> bool:
        """Requeue a held job with the geometry gate overridden by an operator."""
        now = self.clock()
        with self.connection.transaction() as db:
            row = db.execute("SELECT state, reason FROM jobs WHERE id = ?",
                             (job_id,)).fetchone()
            if row is None or row[0] != JobState.HELD:
                return False
            move_job(db, job_id, JobState.QUEUED, now)
            db.execute(
                """UPDATE jobs SET override_geometry = 1, attempts = 0, not_before = NULL,
                   reason = 'released by operator', finished_at = NULL WHERE id = ?""",
                (job_id,),
            )
            # A series held as incomplete: what was accepted stays on the job
            # (status, job page, structure set) after the reason is replaced.
            if row[1] and str(row[1]).startswith(INCOMPLETE_PREFIX):
                db.execute("UPDATE jobs SET override_finding = ? WHERE id = ?", (row[1], job_id))
            return True

    def discard(self, job_id: int, reason: str) -> bool:
        """End a held, failed, skipped or quarantined job for good."""
        now = self.clock()
        with self.connection.transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[0] not in JOB_DISCARDABLE:
                return False
            move_job(db, job_id, JobState.DISCARDED, now)
            db.execute("UPDATE jobs SET reason = ? WHERE id = ?", (reason, job_id))
            return True
