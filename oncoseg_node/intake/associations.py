"""Which series each association carries, and how each association ended.

Completeness needs both (see ``assembly``): a series released normally with
whole counts is complete at once, one whose association was aborted, reset or
timed out is interrupted and waits for the sender to resend.

pynetdicom reports an association's end through several events on two
threads: ``EVT_RELEASED``/``EVT_ABORTED`` on the association's own thread,
``EVT_CONN_CLOSE`` on the upper-layer thread (for a reset or a peer A-ABORT it
comes first), and ``EVT_ACSE_RECV`` with the A-ABORT or A-P-ABORT primitive.
The first of them that knows how it ended decides, once; a C-STORE that
finishes after its connection closed is recorded against that end too.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT

from oncoseg_node.ledger.intake import ENDED_BY_RELEASE

PEER_ABORT = "A-ABORT from the sender"
CONNECTION_LOST = "connection reset or lost (A-P-ABORT)"
NETWORK_TIMEOUT = "network timeout (the node aborted)"
NODE_ABORT = "aborted by the node"
CLOSED_WITHOUT_RELEASE = "connection closed without a release"


def _from_primitive(primitive: Any) -> str | None:
    if isinstance(primitive, A_ABORT):
        return PEER_ABORT
    if isinstance(primitive, A_P_ABORT):
        return CONNECTION_LOST
    return None


@dataclass
class _Association:
    assoc: Any  # held so its id() cannot be reused while this record lives
    series: set[str] = field(default_factory=set)
    abort_seen: str | None = None
    ended_by: str | None = None


class Associations:
    """Thread-safe map of associations to the series they carry and their end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[int, _Association] = {}

    def _record(self, assoc: Any) -> _Association:
        record = self._records.get(id(assoc))
        if record is None or record.assoc is not assoc:
            record = self._records[id(assoc)] = _Association(assoc)
        return record

    def saw(self, assoc: Any, series_uid: str) -> str | None:
        """An instance of ``series_uid`` was stored on ``assoc``.

        Returns how the association ended when it already has (its connection
        closed while this C-STORE was finishing), else None.
        """
        with self._lock:
            record = self._record(assoc)
            record.series.add(series_uid)
            return record.ended_by

    def abort_primitive(self, assoc: Any, primitive: Any) -> None:
        """Remember an A-ABORT or A-P-ABORT the upper layer delivered."""
        how = _from_primitive(primitive)
        if how is not None:
            with self._lock:
                record = self._record(assoc)
                record.abort_seen = record.abort_seen or how

    def end(self, assoc: Any, how: str) -> tuple[list[str], str] | None:
        """Mark ``assoc`` ended; returns (series it carried, how) the first time, else None.

        An abort primitive seen earlier names the interruption better than a
        generic ``how``.
        """
        with self._lock:
            record = self._record(assoc)
            if record.ended_by is not None:
                return None
            if how != ENDED_BY_RELEASE and record.abort_seen is not None:
                how = record.abort_seen
            record.ended_by = how
            # Ended records stay until their thread is gone, for late C-STOREs.
            for key, other in list(self._records.items()):
                if other.ended_by is not None and other is not record and \
                        not _alive(other.assoc):
                    del self._records[key]
            return sorted(record.series), how

    def is_open(self, series_uid: str) -> bool:
        """Whether an association that has not ended carries ``series_uid``."""
        with self._lock:
            return any(series_uid in r.series and r.ended_by is None
                       for r in self._records.values())

    def still_open(self, series_uids: list[str]) -> set[str]:
        with self._lock:
            return {uid for uid in series_uids
                    if any(uid in r.series and r.ended_by is None
                           for r in self._records.values())}


def _alive(assoc: Any) -> bool:
    is_alive = getattr(assoc, "is_alive", None)
    return bool(is_alive()) if callable(is_alive) else False


def how_aborted(assoc: Any) -> str:
    """How an association that pynetdicom reports aborted came to end.

    ``_sent_abort`` is set by pynetdicom's own ``abort()``: the node aborted it,
    either at the network timeout or at shutdown.
    """
    if getattr(assoc, "_sent_abort", False):
        dul = getattr(assoc, "dul", None)
        expired = getattr(dul, "idle_timer_expired", None)
        return NETWORK_TIMEOUT if callable(expired) and expired() else NODE_ABORT
    return CONNECTION_LOST


def how_closed(assoc: Any) -> str:
    """How an association whose connection closed before any end event came to end."""
    dul = getattr(assoc, "dul", None)
    peek = getattr(dul, "peek_next_pdu", None)
    primitive = peek() if callable(peek) else None
    return _from_primitive(primitive) or CLOSED_WITHOUT_RELEASE
