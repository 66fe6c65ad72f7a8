"""The intake tables: received instances and the series they make up.

A row in ``instances`` is written once the file is durable in the spool; a
series stays ``open`` while instances keep arriving and is closed into a job
by :meth:`~oncoseg_node.ledger.jobs.JobRecords.close_series`. Retention asks
here which series are finished for good and forgets their instances.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from enum import StrEnum

from oncoseg_node.ledger.connection import LedgerPart
from oncoseg_node.ledger.states import JOB_DONE_FOR_GOOD, DeliveryState, SeriesState


@dataclass(frozen=True)
class InstanceRecord:
    """What the ledger already knows about a SOP Instance UID."""

    relpath: str
    sha256: str
    series_uid: str


class Recorded(StrEnum):
    """What :meth:`IntakeRecords.record_instance` did with an instance."""

    STORED = "stored"          # a new SOP Instance UID: its row now points at the file
    IDENTICAL = "identical"    # already recorded with the same bytes: the new file is spare
    KEPT_FIRST = "kept_first"  # recorded with other bytes, policy keep_first: new file spare
    REPLACED = "replaced"      # recorded with other bytes, policy replace: the old file is spare


@dataclass(frozen=True)
class RecordResult:
    """The outcome and which spool file (if any) no row points at any more."""

    outcome: Recorded
    spare_relpath: str | None
    existing_sha256: str | None = None


# The primary key on sop_instance_uid decides between concurrent senders of
# one instance: the first insert wins, the others see the conflict inside
# the same immediate transaction and are answered from the stored row.
_INSERT_INSTANCE = """INSERT INTO instances (sop_instance_uid, series_uid, study_uid,
      sop_class_uid, relpath, sha256, size, calling_ae, received_at, instance_number,
      images_in_acquisition, slice_position) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT(sop_instance_uid) DO NOTHING"""
_REPLACE_INSTANCE = """UPDATE instances SET series_uid = ?, study_uid = ?, sop_class_uid = ?,
    relpath = ?, sha256 = ?, size = ?, calling_ae = ?, received_at = ?, instance_number = ?,
    images_in_acquisition = ?, slice_position = ? WHERE sop_instance_uid = ?"""
# Every instance marks its series as being received; the end of the
# association clears the mark (see ``association_ended``), so a mark found at
# start-up means the node stopped while the series was arriving.
_UPSERT_SERIES = """INSERT INTO series (series_uid, study_uid, calling_ae, description, state,
      first_received_at, last_received_at, instance_count, receiving)
    VALUES (?, ?, ?, ?, ?, ?, ?, 1, 1)
    ON CONFLICT(series_uid) DO UPDATE SET
      state = excluded.state, last_received_at = excluded.last_received_at, receiving = 1,
      instance_count = instance_count + (CASE WHEN ? THEN 0 ELSE 1 END)"""
# How the last association carrying a series ended: a normal release, this
# stop of the node, or (written by the handlers) the interruption seen.
ENDED_BY_RELEASE = "release"
ENDED_BY_NODE_STOP = "the node stopped while the series was arriving"
# How its associations ended was lost with the ledger: judged as interrupted.
ENDED_BY_RECONCILED = "registered again from the spool at start (the ledger had lost it)"


@dataclass(frozen=True)
class SeriesEvidence:
    """What the received instances say about a series' completeness.

    ``numbers``: the InstanceNumbers received, sorted; ``expected``: the
    largest ImagesInAcquisition any of them gave; ``positions``: slice
    positions along the slice normal in mm (sorted), one per instance that had
    an ImagePositionPatient and ImageOrientationPatient.
    """

    count: int
    numbers: list[int]
    expected: int | None
    positions: list[float]

# A series may be purged only when it has jobs and every one is finished for
# good (delivered, superseded by a newer version, or ended by rule or
# operator) with no pending delivery. "Idle" counts from the later of the
# last instance and the last job change. Built once from our own constants.
_DONE = ", ".join(f"'{state}'" for state in sorted(JOB_DONE_FOR_GOOD))
_PURGEABLE_SQL = f"""s.state = '{SeriesState.CLOSED}' AND s.last_received_at < :cutoff
    AND EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid)
    AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid
        AND (j.state NOT IN ({_DONE}) OR j.updated_at >= :cutoff))
    AND NOT EXISTS (SELECT 1 FROM deliveries d JOIN jobs j ON j.id = d.job_id
        WHERE j.series_uid = s.series_uid AND d.state = '{DeliveryState.PENDING}')"""
_PURGEABLE_SERIES = f"SELECT series_uid FROM series s WHERE {_PURGEABLE_SQL} ORDER BY series_uid"
_STILL_PURGEABLE = f"SELECT 1 FROM series s WHERE s.series_uid = :uid AND {_PURGEABLE_SQL}"


class IntakeRecords(LedgerPart):
    """Instances and series."""

    def find_instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        rows = self.connection.query(
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
        duplicate_policy: str = "keep_first",
        instance_number: int | None = None,
        images_in_acquisition: int | None = None,
        slice_position: float | None = None,
    ) -> RecordResult:
        """Record a stored instance and (re)open its series' quiet period.

        Safe when several associations record the same SOP Instance UID at
        once: exactly one row results, and the result names the spool file
        that no row points at, for the caller to delete. ``duplicate_policy``
        (``keep_first`` or ``replace``) decides between different bytes.
        """
        now = self.clock()
        with self.connection.transaction() as db:
            inserted = db.execute(
                _INSERT_INSTANCE,
                (sop_instance_uid, series_uid, study_uid, sop_class_uid, relpath, sha256,
                 size, calling_ae, now, instance_number, images_in_acquisition,
                 slice_position),
            ).rowcount == 1
            if inserted:
                result = RecordResult(Recorded.STORED, None)
            else:
                old_relpath, old_sha256, old_series = db.execute(
                    "SELECT relpath, sha256, series_uid FROM instances WHERE sop_instance_uid = ?",
                    (sop_instance_uid,)).fetchone()
                if old_sha256 == sha256 or duplicate_policy != "replace":
                    # Still activity on the series: its quiet period restarts.
                    db.execute("UPDATE series SET last_received_at = ?, receiving = 1 "
                               "WHERE series_uid = ? AND state = ?",
                               (now, old_series, SeriesState.OPEN))
                    outcome = Recorded.IDENTICAL if old_sha256 == sha256 else Recorded.KEPT_FIRST
                    return RecordResult(outcome, relpath, old_sha256)
                db.execute(_REPLACE_INSTANCE, (
                    series_uid, study_uid, sop_class_uid, relpath, sha256, size, calling_ae, now,
                    instance_number, images_in_acquisition, slice_position, sop_instance_uid))
                result = RecordResult(Recorded.REPLACED, old_relpath, old_sha256)
            db.execute(
                _UPSERT_SERIES,
                (series_uid, study_uid, calling_ae, description, SeriesState.OPEN, now, now,
                 not inserted),
            )
            return result

    def touch_series(self, series_uid: str) -> None:
        """Restart a series' quiet period (a duplicate re-sent is still activity)."""
        with self.connection.transaction() as db:
            db.execute(
                """UPDATE series SET last_received_at = ?, receiving = 1
                   WHERE series_uid = ? AND state = ?""",
                (self.clock(), series_uid, SeriesState.OPEN),
            )

    def association_ended(self, series_uids: list[str], ended_by: str,
                          still_receiving: set[str] | frozenset[str] = frozenset()) -> None:
        """Record how the association carrying ``series_uids`` ended.

        ``ended_by`` is ``ENDED_BY_RELEASE`` for a normal release, otherwise
        the interruption (A-ABORT, reset, timeout). A series another open
        association still carries stays marked as being received.
        """
        with self.connection.transaction() as db:
            for uid in series_uids:
                db.execute("UPDATE series SET ended_by = ?, receiving = ? WHERE series_uid = ?",
                           (ended_by, int(uid in still_receiving), uid))

    def interrupt_arriving(self) -> list[str]:
        """At start: series that were arriving when the node stopped count as interrupted.

        Returns their UIDs. Nothing is receiving before the listener starts,
        so a series still marked was cut off by a crash (or kill -9).
        """
        with self.connection.transaction() as db:
            uids = [r[0] for r in db.execute("SELECT series_uid FROM series WHERE receiving = 1")]
            db.execute("UPDATE series SET receiving = 0, ended_by = ? WHERE receiving = 1",
                       (ENDED_BY_NODE_STOP,))
            return uids

    def open_series(self) -> list[sqlite3.Row]:
        return self.connection.query("SELECT * FROM series WHERE state = ?",
                                     (SeriesState.OPEN,))

    def series_instances(self, series_uid: str) -> list[str]:
        rows = self.connection.query(
            "SELECT relpath FROM instances WHERE series_uid = ? ORDER BY received_at",
            (series_uid,),
        )
        return [r["relpath"] for r in rows]

    def series_evidence(self, series_uid: str) -> SeriesEvidence:
        """The count evidence of the instances received so far."""
        rows = self.connection.query(
            """SELECT instance_number, images_in_acquisition, slice_position FROM instances
               WHERE series_uid = ?""", (series_uid,))
        return SeriesEvidence(
            count=len(rows),
            numbers=sorted(r[0] for r in rows if r[0] is not None),
            expected=max((r[1] for r in rows if r[1]), default=None),
            positions=sorted(r[2] for r in rows if r[2] is not None),
        )

    def known_relpaths(self) -> set[str]:
        return {r["relpath"] for r in self.connection.query("SELECT relpath FROM instances")}


    # -- retention ------------------------------------------------------------

    def purgeable_series(self, cutoff: float) -> list[str]:
        """Series idle since before ``cutoff`` whose deliveries are all finished."""
        rows = self.connection.query(_PURGEABLE_SERIES, {"cutoff": cutoff})
        return [r["series_uid"] for r in rows]

    def purge_series(self, series_uid: str, cutoff: float) -> list[str] | None:
        """Mark a purgeable series ``purging``; returns its spool relpaths to delete.

        The condition is checked again inside the transaction, so an instance
        arriving meanwhile (which reopens the series) keeps it. None when the
        series is no longer purgeable. The rows stay until
        :meth:`forget_series`, after the files are deleted: every file in the
        spool always has its row. Jobs and deliveries stay as history.
        """
        with self.connection.transaction() as db:
            if db.execute(_STILL_PURGEABLE, {"uid": series_uid, "cutoff": cutoff}
                          ).fetchone() is None:
                return None
            db.execute("UPDATE series SET state = ? WHERE series_uid = ?",
                       (SeriesState.PURGING, series_uid))
            return [r[0] for r in db.execute(
                "SELECT relpath FROM instances WHERE series_uid = ?", (series_uid,))]

    def purging_series(self) -> list[str]:
        """Series whose purge was interrupted (a crash between the mark and the rows)."""
        rows = self.connection.query("SELECT series_uid FROM series WHERE state = ? "
                                     "ORDER BY series_uid", (SeriesState.PURGING,))
        return [r[0] for r in rows]

    def forget_series(self, series_uid: str, relpaths: list[str]) -> None:
        """Drop the rows of purged files; the series row too unless an instance reopened it."""
        with self.connection.transaction() as db:
            for relpath in relpaths:
                db.execute("DELETE FROM instances WHERE series_uid = ? AND relpath = ?",
                           (series_uid, relpath))
            db.execute("DELETE FROM series WHERE series_uid = ? AND state = ?",
                       (series_uid, SeriesState.PURGING))
            db.execute("""UPDATE series SET instance_count =
                          (SELECT COUNT(*) FROM instances i WHERE i.series_uid = ?)
                          WHERE series_uid = ?""", (series_uid, series_uid))
