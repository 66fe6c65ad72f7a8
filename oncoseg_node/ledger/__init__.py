"""The SQLite ledger every stage records its progress in; survives kill -9.

``connection`` opens the file (WAL, ``synchronous=FULL``) and runs short
immediate transactions; ``migrations`` versions the schema with ``PRAGMA
user_version``; ``states`` holds the job and delivery states and the one
table of their allowed moves; ``intake``, ``jobs`` and ``deliveries`` hold
the statements of one table family each. :class:`Ledger` joins them so
callers write ``ledger.claim(...)``, ``ledger.record_attempt(...)``.

Imports only the shared parts (``errors``, ``durable``). Every stage may import it; it
imports no stage.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from oncoseg_node.durable import private_dir
from oncoseg_node.ledger.connection import Connection
from oncoseg_node.ledger.deliveries import Delivery, DeliveryRecords
from oncoseg_node.ledger.intake import InstanceRecord, IntakeRecords
from oncoseg_node.ledger.jobs import Job, JobRecords
from oncoseg_node.ledger.migrations import migrate
from oncoseg_node.ledger.states import DeliveryState, JobState, SeriesState

__all__ = ["Delivery", "DeliveryState", "InstanceRecord", "Job", "JobState", "Ledger",
           "SeriesState"]


class Ledger(IntakeRecords, JobRecords, DeliveryRecords):
    """Thread-safe access to the ledger file at ``path``, migrated to the latest schema."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        if not self.path.parent.exists():  # an existing folder is the service's to secure
            private_dir(self.path.parent)
        self.clock = clock
        self.connection = Connection(self.path)
        try:
            with self.connection.transaction() as db:
                self.schema_versions = migrate(db, str(self.path))
        except BaseException:
            self.connection.close()
            raise

    def close(self) -> None:
        self.connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.connection.transaction() as db:
            yield db
