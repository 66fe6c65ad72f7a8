"""The ledger: instances, series, jobs and deliveries in one SQLite file.

SQLite in WAL mode with ``synchronous=FULL``: a committed row survives
``kill -9`` and power loss. Every state change is one short transaction.
Claiming a job moves its attempt counter in the same transaction, so a
series that crashes the worker is quarantined after ``max_attempts`` rather
than crashing it forever. Several processes (the daemon, ``oncoseg-node
status``/``retry``) may open the ledger at once.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oncoseg_node.errors import LedgerError

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    relpath TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT,
    received_at REAL NOT NULL,
    instance_number INTEGER,
    images_in_acquisition INTEGER
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    calling_ae TEXT,
    description TEXT,
    state TEXT NOT NULL,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    series_uid TEXT NOT NULL,
    version INTEGER NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    calling_ae TEXT,
    protocol TEXT,
    protocol_version TEXT,
    rtstruct_relpath TEXT,
    rtstruct_uid TEXT,
    results TEXT,
    override_geometry INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    UNIQUE (series_uid, version)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    relpath TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_status INTEGER,
    reason TEXT,
    transaction_uid TEXT,
    stored_at REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    delivered_at REAL,
    UNIQUE (job_id, destination)
);
"""

# Job states. A job is "sent" only when every destination answered Success.
QUEUED, RUNNING, HELD, DELIVERING, SENT, FAILED = (
    "queued", "running", "held", "delivering", "sent", "failed",
)
QUARANTINED, SKIPPED, SUPERSEDED = "quarantined", "skipped", "superseded"
DISCARDED = "discarded"
JOB_STATES = (QUEUED, RUNNING, HELD, DELIVERING, SENT, FAILED, QUARANTINED, SKIPPED, SUPERSEDED,
              DISCARDED)
# Delivery states.
PENDING, DELIVERED = "pending", "delivered"
# Series states: "open" while its quiet period runs, "closed" once a job covers it.
OPEN, CLOSED = "open", "closed"


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    version: int
    state: str
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


@dataclass(frozen=True)
class Delivery:
    id: int
    job_id: int
    destination: str
    sop_instance_uid: str
    relpath: str
    state: str
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


@dataclass(frozen=True)
class InstanceRecord:
    """What the ledger already knows about a SOP Instance UID."""

    relpath: str
    sha256: str
    series_uid: str


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["results"] = json.loads(data["results"]) if data["results"] else None
    return Job(**data)


def _delivery(row: sqlite3.Row) -> Delivery:
    data = dict(row)
    for key in ("created_at", "updated_at"):
        data.pop(key)
    return Delivery(**data)


class Ledger:
    """Thread-safe access to the ledger; one connection guarded by a lock."""

    def __init__(self, path: Path, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.clock = clock
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: writers queue instead of failing mid-way."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _query(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- instances and series -------------------------------------------------

    def find_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        rows = self._query(
            "SELECT relpath, sha256, series_uid FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        return InstanceRecord(**dict(rows[0])) if rows else None

    def record_instance(
        self,
        *,
        sop_instance_uid: str,
        series_uid: str,
        study_uid: str,
        sop_class_uid: str,
        relpath: str,
        sha256: str,
        size: int,
        calling_ae: str | None,
        description: str | None = None,
        replace: bool = False,
        instance_number: int | None = None,
        images_in_acquisition: int | None = None,
    ) -> None:
        """Record a stored instance and (re)open its series' quiet period."""
        now = self.clock()
        with self.transaction() as db:
            verb = "INSERT OR REPLACE" if replace else "INSERT"
            db.execute(
                f"{verb} INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (sop_instance_uid, series_uid, study_uid, sop_class_uid, relpath, sha256,
                 size, calling_ae, now, instance_number, images_in_acquisition),
            )
            db.execute(
                """INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, 1)
                   ON CONFLICT(series_uid) DO UPDATE SET
                     state = 'open', last_received_at = excluded.last_received_at,
                     instance_count = instance_count + (CASE WHEN ? THEN 0 ELSE 1 END)""",
                (series_uid, study_uid, calling_ae, description, OPEN, now, now, replace),
            )

    def touch_series(self, series_uid: str) -> None:
        """Restart a series' quiet period (a duplicate re-sent is still activity)."""
        with self.transaction() as db:
            db.execute(
                "UPDATE series SET last_received_at = ? WHERE series_uid = ? AND state = ?",
                (self.clock(), series_uid, OPEN),
            )

    def open_series(self) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM series WHERE state = ?", (OPEN,))

    def series_instances(self, series_uid: str) -> list[str]:
        rows = self._query(
            "SELECT relpath FROM instances WHERE series_uid = ? ORDER BY received_at",
            (series_uid,),
        )
        return [r["relpath"] for r in rows]

    def series_evidence(self, series_uid: str) -> tuple[list[int], int | None]:
        """InstanceNumbers received so far and the largest ImagesInAcquisition seen."""
        rows = self._query(
            """SELECT instance_number, images_in_acquisition FROM instances
               WHERE series_uid = ?""", (series_uid,))
        numbers = sorted(r[0] for r in rows if r[0] is not None)
        expected = max((r[1] for r in rows if r[1]), default=None)
        return numbers, expected

    def known_relpaths(self) -> set[str]:
        return {r["relpath"] for r in self._query("SELECT relpath FROM instances")}

    def relpath_known(self, relpath: str) -> bool:
        return bool(self._query("SELECT 1 FROM instances WHERE relpath = ? LIMIT 1", (relpath,)))

    def close_series(self, series_uid: str) -> int | None:
        """Close a quiet series into a job; returns the new job id, or None.

        A job that is still queued simply covers the new instances (it reads
        the series when it runs). Otherwise a new version is created: the
        series is never split into two jobs.
        """
        now = self.clock()
        with self.transaction() as db:
            row = db.execute(
                "SELECT * FROM series WHERE series_uid = ? AND state = ?", (series_uid, OPEN)
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE series SET state = ? WHERE series_uid = ?", (CLOSED, series_uid))
            queued = db.execute(
                "SELECT id FROM jobs WHERE series_uid = ? AND state = ?", (series_uid, QUEUED)
            ).fetchone()
            if queued is not None:
                return None
            (version,) = db.execute(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM jobs WHERE series_uid = ?",
                (series_uid,),
            ).fetchone()
            cursor = db.execute(
                """INSERT INTO jobs (series_uid, version, state, calling_ae, created_at,
                   updated_at) VALUES (?, ?, ?, ?, ?, ?)""",
                (series_uid, version, QUEUED, row["calling_ae"], now, now),
            )
            assert cursor.lastrowid is not None  # set by every successful INSERT
            return cursor.lastrowid

    # -- retention ------------------------------------------------------------

    # A series may be purged only when it has jobs and every one is in one of
    # these states: delivered, superseded by a newer version, or ended by rule
    # or operator; held, failed and quarantined jobs still await a person.
    # "Idle" counts from the later of the last instance and the last job change.
    _PURGEABLE_SQL = f"""s.state = '{CLOSED}' AND s.last_received_at < :cutoff
        AND EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid)
        AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid
            AND (j.state NOT IN ('{SENT}', '{SUPERSEDED}', '{SKIPPED}', '{DISCARDED}')
                 OR j.updated_at >= :cutoff))
        AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON j.id = d.job_id
            WHERE j.series_uid = s.series_uid AND d.state = '{PENDING}')"""

    def purgeable_series(self, cutoff: float) -> list[str]:
        """Series idle since before ``cutoff`` whose deliveries are all finished."""
        rows = self._query(
            f"SELECT series_uid FROM series s WHERE {self._PURGEABLE_SQL} ORDER BY series_uid",
            {"cutoff": cutoff})
        return [r["series_uid"] for r in rows]

    def purge_series(self, series_uid: str, cutoff: float) -> list[str] | None:
        """Forget a purgeable series' instances; returns their spool relpaths to delete.

        The condition is checked again inside the transaction, so an instance
        arriving meanwhile (which reopens the series) keeps it. None when the
        series is no longer purgeable. Jobs and deliveries stay as history.
        """
        with self.transaction() as db:
            if db.execute(f"SELECT 1 FROM series s WHERE s.series_uid = :uid AND "
                          f"{self._PURGEABLE_SQL}", {"uid": series_uid, "cutoff": cutoff}
                          ).fetchone() is None:
                return None
            relpaths = [r[0] for r in db.execute(
                "SELECT relpath FROM instances WHERE series_uid = ?", (series_uid,))]
            db.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
            db.execute("DELETE FROM series WHERE series_uid = ?", (series_uid,))
            return relpaths

    # -- jobs -----------------------------------------------------------------

    def claim(self, max_attempts: int) -> Job | None:
        """Take the oldest queued job whose series is quiet; attempts += 1 atomically."""
        now = self.clock()
        with self.transaction() as db:
            while True:
                row = db.execute(
                    """SELECT j.* FROM jobs j JOIN series s ON s.series_uid = j.series_uid
                       WHERE j.state = ? AND s.state = ? ORDER BY j.id LIMIT 1""",
                    (QUEUED, CLOSED),
                ).fetchone()
                if row is None:
                    return None
                if row["attempts"] >= max_attempts:
                    db.execute(
                        "UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE id = ?",
                        (QUARANTINED, f"quarantined after {row['attempts']} attempts: "
                         f"{row['reason'] or 'worker stopped during the job'}", now, row["id"]),
                    )
                    continue
                db.execute(
                    """UPDATE jobs SET state = ?, attempts = attempts + 1, started_at = ?,
                       updated_at = ? WHERE id = ?""",
                    (RUNNING, now, now, row["id"]),
                )
                return _job(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def requeue_interrupted(self) -> int:
        """At start: jobs left running by a crash go back to the queue."""
        with self.transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE state = ?",
                (QUEUED, self.clock(), RUNNING),
            )
            return cursor.rowcount

    def update_job(self, job_id: int, **fields: Any) -> None:
        """Set job columns; ``state`` must be a known state."""
        state = fields.get("state")
        if state is not None and state not in JOB_STATES:
            raise LedgerError(f"unknown job state {state!r}")
        if "results" in fields and fields["results"] is not None:
            fields["results"] = json.dumps(fields["results"])
        fields["updated_at"] = self.clock()
        if state in (SENT, FAILED, HELD, QUARANTINED, SKIPPED, DISCARDED):
            fields.setdefault("finished_at", fields["updated_at"])
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self.transaction() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def job(self, job_id: int) -> Job | None:
        rows = self._query("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, limit: int = 100) -> list[Job]:
        return [_job(r) for r in self._query("SELECT * FROM jobs ORDER BY id DESC LIMIT ?",
                                             (limit,))]

    def jobs_of_series(self, series_uid: str) -> list[Job]:
        rows = self._query("SELECT * FROM jobs WHERE series_uid = ? ORDER BY version",
                           (series_uid,))
        return [_job(r) for r in rows]

    def count_jobs_by_state(self) -> dict[str, int]:
        rows = self._query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
        return {r["state"]: r["n"] for r in rows}

    # -- deliveries -----------------------------------------------------------

    def start_deliveries(self, job_id: int, targets: Sequence[tuple[str, str, str]]) -> None:
        """Job written: one pending delivery per (destination, SOP Instance UID, file).

        Pending deliveries of older versions of the same series are
        superseded: the planning system gets the newest structure set only.
        """
        now = self.clock()
        with self.transaction() as db:
            job = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            db.execute(
                """UPDATE deliveries SET state = ?, reason = ?, updated_at = ?
                   WHERE state = ? AND job_id IN (SELECT id FROM jobs WHERE series_uid = ?
                   AND version < ?)""",
                (SUPERSEDED, f"superseded by version {job['version']}", now, PENDING,
                 job["series_uid"], job["version"]),
            )
            db.execute(
                """UPDATE jobs SET state = ?, updated_at = ? WHERE series_uid = ? AND
                   version < ? AND state IN (?, ?)""",
                (SUPERSEDED, now, job["series_uid"], job["version"], DELIVERING, QUEUED),
            )
            for name, uid, relpath in targets:
                db.execute(
                    """INSERT INTO deliveries (job_id, destination, sop_instance_uid, relpath,
                       state, next_attempt_at, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                    (job_id, name, uid, relpath, PENDING, now, now, now),
                )
            db.execute(
                "UPDATE jobs SET state = ?, updated_at = ? WHERE id = ?",
                (DELIVERING if targets else SENT, now, job_id),
            )

    def deliveries(self, job_id: int | None = None, state: str | None = None) -> list[Delivery]:
        sql, args = "SELECT * FROM deliveries WHERE 1=1", list[object]()
        if job_id is not None:
            sql += " AND job_id = ?"
            args.append(job_id)
        if state is not None:
            sql += " AND state = ?"
            args.append(state)
        return [_delivery(r) for r in self._query(sql + " ORDER BY id", args)]

    def delivery(self, delivery_id: int) -> Delivery | None:
        rows = self._query("SELECT * FROM deliveries WHERE id = ?", (delivery_id,))
        return _delivery(rows[0]) if rows else None

    def record_attempt(self, delivery_id: int, *, state: str, status: int | None,
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
        with self.transaction() as db:
            db.execute(
                """UPDATE deliveries SET state = ?, attempts = attempts + ?, last_status = ?,
                   reason = ?, next_attempt_at = COALESCE(?, next_attempt_at),
                   delivered_at = CASE WHEN ? = 'delivered' THEN ? ELSE delivered_at END,
                   transaction_uid = ?, stored_at = ?, updated_at = ?
                   WHERE id = ? AND state = 'pending'""",
                (state, int(count_attempt), status, reason, next_attempt_at, state, now,
                 commitment[0] if commitment else None, commitment[1] if commitment else None,
                 now, delivery_id),
            )
            self._finish_job_if_done(db, delivery_id, reason, now)

    def commitment_report(self, transaction_uid: str, committed: bool, reason: str) -> int | None:
        """Apply a destination's Storage Commitment report; returns the delivery id.

        A success delivers; a failure sends the object again at once (same SOP
        Instance UID), since the destination says it does not hold it.
        """
        now = self.clock()
        with self.transaction() as db:
            row = db.execute(
                "SELECT id FROM deliveries WHERE transaction_uid = ? AND state = ?",
                (transaction_uid, PENDING),
            ).fetchone()
            if row is None:
                return None
            if committed:
                db.execute(
                    """UPDATE deliveries SET state = ?, delivered_at = ?, reason = ?,
                       updated_at = ? WHERE id = ?""",
                    (DELIVERED, now, reason, now, row["id"]),
                )
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
        states = [r[0] for r in db.execute(
            "SELECT state FROM deliveries WHERE job_id = ?", (job_id,))]
        if PENDING in states:
            return
        final = SENT if all(s == DELIVERED for s in states) else FAILED
        if SUPERSEDED in states:
            final = SUPERSEDED
        db.execute(
            """UPDATE jobs SET state = ?, finished_at = ?, updated_at = ?,
               reason = CASE WHEN ? = 'failed' THEN ? ELSE reason END
               WHERE id = ? AND state = ?""",
            (final, now, now, final, reason, job_id, DELIVERING),
        )

    def retry_deliveries(self, job_id: int, destination: str | None = None) -> int:
        """Put a job's failed (or pending) deliveries back to be tried now."""
        now = self.clock()
        with self.transaction() as db:
            sql = """UPDATE deliveries SET state = ?, next_attempt_at = ?, updated_at = ?
                     WHERE job_id = ? AND state IN (?, ?)"""
            args: list[Any] = [PENDING, now, now, job_id, FAILED, PENDING]
            if destination is not None:
                sql += " AND destination = ?"
                args.append(destination)
            count = db.execute(sql, args).rowcount
            if count:
                db.execute(
                    "UPDATE jobs SET state = ?, reason = NULL, updated_at = ? WHERE id = ?",
                    (DELIVERING, now, job_id),
                )
            return count

    # -- operator decisions ---------------------------------------------------

    def release(self, job_id: int) -> bool:
        """Requeue a held job with the geometry gate overridden by an operator."""
        with self.transaction() as db:
            cursor = db.execute(
                """UPDATE jobs SET state = ?, override_geometry = 1, attempts = 0,
                   reason = 'released by operator', finished_at = NULL, updated_at = ?
                   WHERE id = ? AND state = ?""",
                (QUEUED, self.clock(), job_id, HELD),
            )
            return cursor.rowcount == 1

    def discard(self, job_id: int, reason: str) -> bool:
        """End a held, failed or quarantined job for good."""
        now = self.clock()
        with self.transaction() as db:
            cursor = db.execute(
                f"""UPDATE jobs SET state = ?, reason = ?, finished_at = ?, updated_at = ?
                   WHERE id = ? AND state IN ('{HELD}', '{FAILED}', '{QUARANTINED}',
                   '{SKIPPED}')""",
                (DISCARDED, reason, now, now, job_id),
            )
            return cursor.rowcount == 1

    def resend(self, series_uid: str, destination: str | None = None) -> int | None:
        """Send the newest written structure set of a series again (same SOP Instance UID).

        Returns the job id, or None when the series has no written structure set.
        """
        now = self.clock()
        with self.transaction() as db:
            job = db.execute(
                """SELECT j.id FROM jobs j WHERE j.series_uid = ? AND EXISTS
                   (SELECT 1 FROM deliveries d WHERE d.job_id = j.id)
                   ORDER BY j.version DESC LIMIT 1""",
                (series_uid,),
            ).fetchone()
            if job is None:
                return None
            sql = """UPDATE deliveries SET state = ?, next_attempt_at = ?, updated_at = ?,
                     delivered_at = NULL WHERE job_id = ?"""
            args: list[Any] = [PENDING, now, now, job["id"]]
            if destination is not None:
                sql += " AND destination = ?"
                args.append(destination)
            if db.execute(sql, args).rowcount == 0:
                return None
            db.execute("UPDATE jobs SET state = ?, reason = NULL, updated_at = ? WHERE id = ?",
                       (DELIVERING, now, job["id"]))
            return int(job["id"])
