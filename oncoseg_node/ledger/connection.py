"""The ledger's SQLite connection: PRAGMAs, one lock, short immediate transactions.

WAL mode with ``synchronous=FULL``: a committed row survives ``kill -9`` and
power loss. The file is created 0600 before SQLite opens it, and SQLite gives
its -wal and -shm files the database file's mode, so all three stay private
whatever the umask. ``PRAGMA quick_check`` runs at open: a damaged file
stops whoever opens it with one :class:`~oncoseg_node.errors.LedgerError`
line saying what to do, before anything reads or writes a wrong row.
Several processes (the daemon, ``oncoseg-node status``/``retry``)
may open the file at once; ``BEGIN IMMEDIATE`` makes writers queue on
SQLite's busy timeout instead of failing half-way through.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from oncoseg_node.durable import private_file
from oncoseg_node.errors import LedgerError

BUSY_TIMEOUT_S = 30.0


def damaged_message(path: Path, problems: list[str]) -> str:
    """One line for the operator: which file, what SQLite found, and what to do."""
    found = problems[0] + (f" (and {len(problems) - 1} more problems)" if len(problems) > 1
                           else "")
    return (f"ledger {path} is damaged ({found}): stop the node, move {path.name} and its "
            f"-wal and -shm files out of {path.parent} (keep them; sqlite3's .recover may "
            "save rows), restore a backup or start without one: the node then registers "
            "the spooled instances again and contours their series once")


class Connection:
    """One SQLite connection shared by the node's threads, guarded by a lock."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        for name in (self.path, *(self.path.with_name(self.path.name + s)
                                   for s in ("-wal", "-shm"))):
            if name == self.path or name.exists():
                private_file(name)  # -wal and -shm only when left from an earlier run
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
        )
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            problems = [str(r[0]) for r in self._db.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                self._db.close()
                raise  # busy, not damaged: the caller's error, with SQLite's words
            problems = [str(exc)]
        if problems != ["ok"]:
            self._db.close()
            raise LedgerError(damaged_message(self.path, problems))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT; any exception rolls the whole change back."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def query(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run one read statement and return every row."""
        with self._lock:
            return self._db.execute(sql, args).fetchall()


class LedgerPart:
    """Base of the per-table parts the :class:`~oncoseg_node.ledger.Ledger` is made of.

    Each part holds the statements of one table family; they share the
    ledger's connection and clock (injectable so tests can move time).
    """

    connection: Connection
    clock: Callable[[], float]
