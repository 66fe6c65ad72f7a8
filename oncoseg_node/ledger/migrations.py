"""The ledger's schema, as ordered, numbered migrations recorded in ``PRAGMA user_version``.

Schema 1 is the ledger as first deployed (instances, series, jobs,
deliveries). A ledger written before versions existed reads ``user_version``
0; its tables already match schema 1, which only creates what is missing, so
it is upgraded in place with every row kept. Each later change to a table is
a new :class:`Migration` appended to :data:`MIGRATIONS` with the next number,
and never edited once released: a ledger in a hospital may be at any earlier
version. All pending migrations run in one transaction, so a crash leaves the
ledger at its old version, never half-way.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from oncoseg_node.errors import LedgerError

SCHEMA_1 = (
    """CREATE TABLE IF NOT EXISTS instances (
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
    )""",
    "CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_uid)",
    """CREATE TABLE IF NOT EXISTS series (
        series_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL,
        calling_ae TEXT,
        description TEXT,
        state TEXT NOT NULL,
        first_received_at REAL NOT NULL,
        last_received_at REAL NOT NULL,
        instance_count INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS jobs (
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
    )""",
    """CREATE TABLE IF NOT EXISTS deliveries (
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
    )""",
)


@dataclass(frozen=True)
class Migration:
    """One schema step: ``statements`` take a ledger from ``version - 1`` to ``version``."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "instances, series, jobs and deliveries", SCHEMA_1),
    # A job that failed in a way a later attempt can pass waits until then,
    # so the series behind it are not blocked (see JobRecords.defer_job).
    Migration(2, "jobs.not_before", ("ALTER TABLE jobs ADD COLUMN not_before REAL",)),
    # Seconds per stage (load, segment, write) as JSON, for the jobs page and
    # status: a physicist asks where a slow series spent its time. The gate's
    # finding an operator overrode, kept apart from ``reason`` (which later
    # states overwrite) so a released job shows what was accepted.
    Migration(3, "jobs.stage_seconds and jobs.override_finding",
              ("ALTER TABLE jobs ADD COLUMN stage_seconds TEXT",
               "ALTER TABLE jobs ADD COLUMN override_finding TEXT")),
    # How the association carrying a series ended (and whether one still is)
    # and each slice's position: the count evidence of completeness (see
    # intake.assembly); a series still receiving at start-up was cut off.
    Migration(4, "series completeness: whether an association is carrying the series, how "
              "the last one ended, and each instance's slice position", (
                  "ALTER TABLE series ADD COLUMN receiving INTEGER NOT NULL DEFAULT 0",
                  "ALTER TABLE series ADD COLUMN ended_by TEXT",
                  "ALTER TABLE instances ADD COLUMN slice_position REAL",
              )),
)
LATEST_VERSION = MIGRATIONS[-1].version


def schema_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, source: str) -> tuple[int, int]:
    """Bring the ledger up to :data:`LATEST_VERSION`; returns (version before, after).

    Call inside a ``BEGIN IMMEDIATE`` transaction: two processes opening an
    old ledger at once then migrate it once. ``source`` names the file in
    the error raised for a ledger written by a newer release.
    """
    before = schema_version(db)
    if before > LATEST_VERSION:
        raise LedgerError(
            f"{source} has ledger schema {before}, newer than this release's "
            f"{LATEST_VERSION}: run the release that wrote it, or restore a backup")
    for migration in MIGRATIONS:
        if migration.version <= before:
            continue
        for statement in migration.statements:
            db.execute(statement)
        # PRAGMA takes no parameters; the value is one of our own integers.
        db.execute(f"PRAGMA user_version = {int(migration.version)}")
    return before, schema_version(db)
